"""Types both sides of the wire share and neither owns: the error enum and a
region's definition. Everything else imports these; they import nothing of
the project. (And the bytes-like type data moves in.)"""
