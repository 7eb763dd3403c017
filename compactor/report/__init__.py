"""Reports rendered from a manifest: Markdown now, HTML later."""
