"""The Flower app objects that `flwr run .` and SuperNodes load, and how a deployed bank finds its file."""

import tomllib
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from clients.client_app import _data_path
from clients.client_app import app as client_app
from models.config import PYPROJECT, load_config
from server.server_app import app as server_app


def test_components_named_in_pyproject_exist():
    components = tomllib.loads(Path(PYPROJECT).read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.server_app:app", "clientapp": "clients.client_app:app"}
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)


def test_a_bank_finds_its_file_from_the_node_config_or_the_data_dir(tmp_path):
    config = load_config()
    assert _data_path({"data-path": "/banks/mine.parquet"}, config) == "/banks/mine.parquet"
    with_dir = load_config({"data-dir": str(tmp_path)})
    assert _data_path({"partition-id": 3}, with_dir) == str(tmp_path / "bank_03.parquet")
    with pytest.raises(ValueError, match="'data-path'"):
        _data_path({}, config)
