"""The upstairs/downstairs wire protocol (Crucible message version 13), sans-IO."""
