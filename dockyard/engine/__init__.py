"""The inference engine: requests, scheduling, model running and sampling."""
