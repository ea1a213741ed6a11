"""HTTP routes: thin handlers that call services and render schemas."""
