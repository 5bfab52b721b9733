"""Reporting: what llmopt tells people — the compile summary, `report` (HTML / Markdown),
`compare`, and the JSON report files."""
