"""One router per resource; `service.main` mounts them (the /v1 ones behind the API key)."""
