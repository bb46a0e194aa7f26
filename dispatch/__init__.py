"""dispatch: keep a fleet of AI coding agents working on a Gitea/Forgejo backlog."""

__version__ = "0.1.0"
