"""The receiving side: export names, the NBD session the nbdkit plugin drives, ``serve``."""
