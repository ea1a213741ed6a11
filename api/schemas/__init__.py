"""Request and response models, one module per feature: the OpenAPI contract of DESIGN.md §3.

`common` holds the strict request base, the response base (built from ORM rows by attribute,
timestamps as Unix seconds via `UnixTime`) and the helpers that document the core's bounds;
`files`, `models`, `jobs`, `adapters`, `inference` and `health` the schemas of their routes.
"""
