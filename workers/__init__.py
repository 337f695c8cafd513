"""The RQ worker: one model resident in the process, edit jobs applied in stream order.

`crispedit worker --model M --store DIR` loads the model once, keeps it, its base weights and its
capability curvature across jobs, and takes jobs from the queue `crispedit:M` (see `jobs.py` for
the job contract the API enqueues against).
"""
