"""The dff.v1 gRPC contracts (generated stubs in v1/) and the small helpers every side shares:
domain errors (errors.py), tensors on the wire (wire.py), status-code mapping (status.py)."""
