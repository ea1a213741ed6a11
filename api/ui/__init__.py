"""The dashboard at /ui: server-rendered page shells plus small scripts calling the public API.

Pages hold no data of their own: each script calls `/v1/...` with the API key kept in the
browser's session storage (sent as the bearer token), so a page shows exactly what the key's
tenant may see, and the API's own validation errors are what the forms show. The one charting
library, uPlot, is vendored under static/vendor with its licence; nothing loads from a network.
"""
from api.ui.pages import install_ui

__all__ = ["install_ui"]
