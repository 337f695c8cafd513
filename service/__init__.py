"""The FastAPI front end (edits, jobs, streams, versions, deltas). Not built yet: see the service
issue."""
