"""The bundled demo's model and data factories."""
