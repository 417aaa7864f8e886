"""The bridge to vLLM's OpenAI-compatible server: the server child process (`process.py`), the `vllm` command
shim that runs it under either distribution name (`vllm_cli.py`), API-key auth for every endpoint
(`api_auth.py`), the tool-call / reasoning parser choice (`parsers.py`) and secret redaction (`redact.py`).

It runs in the CLI's process and starts vLLM in a child; only `vllm_cli.py` and `api_auth.py` run inside that
child and import vLLM. Importing `vmetal.server.process` stays as cheap as the CLI needs.
"""
