from crucible.common.buffer import Buffer

VECTOR: int

def block_hashes(data: Buffer, block_size: int, vector: bool = True, /) -> list[int]: ...
