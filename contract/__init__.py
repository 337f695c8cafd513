"""The project's shared contract: what the engine, the worker, the API and the bench must agree on.

- `contract.facts`: fact records and their parsing (relation ids included) into `Fact`s;
- `contract.settings`: `EditSettings`, every editor option with its default and bounds;
- `contract.jobs`: the edit job's queue and key names, payload and result;
- `contract.names`: model/stream name and version-id rules, artifact file names.

Standard library only, so that the API imports it without torch (a test guards it).
"""
