"""The OpenAI-compatible, governed inference server: `python -m serving.main` (see serving/main.py).

Public API (see each module's docstring; serving/service.py and serving/engine.py explain the threads):
  serving.engine      Engine, EngineConfig, EngineRequest: continuous batching over a fixed number of slots
  serving.gating      per-slot policies (one compiled policy per slot of the running batch)
  serving.governance  API keys and principals, effective policies, sessions (SQLite), the audit trail
  serving.tools       tool calls: what a request may call, the prompt, the action boundary, streaming hold
  serving.context     a turn's documents, protected spans, evidence, escalation counters -> per-slot gate states
  serving.service     Service: model + engine + governance behind the API
  serving.api         create_app: the FastAPI app (routes, errors in OpenAI's shape, SSE)
  serving.config      ServerConfig, load_config: the TOML file and its defaults
  serving.mock        load_mock: a model whose answers can be worked out by hand (tests, demos)
"""

from serving.config import ConfigError, ServerConfig, load_config
from serving.engine import Draining, Engine, EngineConfig, EngineRequest, QueueFull, SlotResult
from serving.governance import KeyRing, Principal, hash_key
from serving.service import APIError, Service

__all__ = [
    "APIError", "ConfigError", "Draining", "Engine", "EngineConfig", "EngineRequest", "KeyRing", "Principal",
    "QueueFull", "ServerConfig", "Service", "SlotResult", "hash_key", "load_config",
]
