"""The RQ worker that keeps a model resident and applies edit jobs. Not built yet: see the
service issue."""
