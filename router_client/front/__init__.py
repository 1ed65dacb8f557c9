"""The HTTP front of the router: LoRAX's REST API and OpenAI's API over HTTP (`qwen-router serve`)."""
