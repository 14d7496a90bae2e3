"""Unit tests: in-process code (the worker's pipeline and runner on the tiny model, storage, the Lua scripts and
state changes on the session's private Redis) and checks of the tree (layout, OpenAPI, README, deploy files).
No API or worker process is started here."""
