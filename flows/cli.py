"""CLI verbs of this package (registered by medddpm.cli)."""


def register(subparsers) -> None:
    pass
