"""The committed gRPC stubs are exactly what protos/generate.py makes from the .proto files."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_current():
    pytest.importorskip("grpc_tools")
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_stubs_import_package_qualified():
    from dff_protos.v1 import engine_pb2_grpc, features_pb2_grpc

    assert features_pb2_grpc.FeatureServiceStub
    assert engine_pb2_grpc.ConceptEngineStub
