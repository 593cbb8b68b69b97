"""The example DAGs parse cleanly and run end to end (``dag.test()``) against the emulator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import CATALOG, ROOT
from tests.test_operator import PNG_MAGIC, ti_of, xcom

EXAMPLES = sorted(p.stem for p in (ROOT / "dags_examples").glob("*.py"))


def test_examples_folder_parses_without_import_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags_examples"))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == set(EXAMPLES)
    for dag in bag.dags.values():
        assert "speedpix" in dag.tags


def load(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def products_csv(path: Path, count: int) -> Path:
    """Write a catalog CSV of ``count`` products (P0, P1...) that all show the examples' product image."""
    image = ROOT / "dags_examples" / "data" / "product.png"
    rows = [("product_id", "name", "image", "prompt")]
    rows += [(f"P{i}", f"thing {i}", str(image), f"thing {i} on white") for i in range(count)]
    path.write_text("".join(",".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def examples(example_dags_folder, speedpix_conn, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDPIX_OUTPUT_DIR", str(tmp_path / "output"))
    # SPEEDPIX_CATALOG_URI: set by example_dags_folder, one URI per session (see conftest.CATALOG)
    return example_dags_folder


def test_white_background(examples, speedpix_conn, tmp_path):
    dr = load(examples, "speedpix_white_background").test()
    assert dr.state == "success"
    [image] = (tmp_path / "output").rglob("images.png")
    assert image.read_bytes()[:8] == PNG_MAGIC
    assert speedpix_conn.stats()["calls"]["comfy_prompt"] == 1


def test_catalog_regeneration_maps_one_prediction_per_product(examples, speedpix_conn, tmp_path):
    csv = products_csv(tmp_path / "products.csv", 3)
    dr = load(examples, "speedpix_catalog_regeneration").test(run_conf={"products_csv": str(csv)})
    assert dr.state == "success"
    tis = [ti for ti in dr.get_task_instances() if ti.task_id == "regenerate"]
    assert sorted(ti.map_index for ti in tis) == [0, 1, 2]
    assert speedpix_conn.stats()["calls"]["comfy_prompt"] == 3
    run_folder = dr.run_id.replace(":", "_").replace("+", "_")
    files = sorted((CATALOG / run_folder).rglob("images.png"))
    assert [f.parent.name for f in files] == ["P0", "P1", "P2"]
    assert xcom(dr, "publish") == {"products": 3, "files": 3}
    assert ti_of(dr, "publish").state == "success"
    # the Asset outlet fired once, so DAGs scheduled on fresh catalog images start
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = session.query(AssetEvent).filter_by(source_run_id=dr.run_id).all()
    assert [e.source_task_id for e in events] == ["publish"]


def test_fire_and_forget_then_sensor(examples, speedpix_conn):
    dr = load(examples, "speedpix_fire_and_forget").test()
    assert dr.state == "success"
    assert xcom(dr, "report").startswith(speedpix_conn.url)
    assert speedpix_conn.stats()["calls"]["comfy_prompt"] == 1
