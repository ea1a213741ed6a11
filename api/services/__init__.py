"""Service logic: keyword-only functions over a session and storage, no HTTP types."""
