"""Deployment: a Triton model repository built from the manifest's measurements,
versioned releases gated on ``check --against`` the live version, rollback, and drift
monitoring in Prometheus' text format. See docs/deploy.md."""
