"""The job contract shared by the API and the worker.

Imports only the standard library and pydantic: the API process must never pull in torch or diffusers.
"""
