"""End-to-end tests: real API, worker, dispatcher and cleanup processes on private Redis servers, driven over
HTTP, the CLI, a generated client, a browser and schemathesis. Their stacks: tests/e2e/conftest.py."""
