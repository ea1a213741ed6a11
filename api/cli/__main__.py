"""`python -m api.cli ARGS`: the `speft` command line."""
from api.cli import app

app()
