"""The FastAPI front end of CrispEdit: edits, jobs, streams, versions, deltas, health and metrics.

Start with `service.main.create_app`; `service.jobqueue` holds the contract with the RQ workers.
Nothing in this package imports torch (a test checks it): the engine runs in the workers.
"""
