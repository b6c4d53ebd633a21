"""``medusa-lora serve``: many task adapters, each with its own Medusa heads, on one base behind an
OpenAI-compatible API (FastAPI + uvicorn), one request at a time from a bounded queue."""
