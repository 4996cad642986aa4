"""The OpenAI-compatible front door: route by `model`, scale from zero, explain a 429, hold cold starts."""
