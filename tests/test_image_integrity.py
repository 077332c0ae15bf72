"""What is sent is what was hashed: a local image replaced between reading the table and sending
its generate is never sent under the old image's hash (which would make the next run, hashing
the new image, pay for it again).

A request reads its local image once, when it is made (``LocalImage``: path, size, sha256); the
request's hash counts that sha256 and the body is built only from a file that still has those
bytes. A file that changed is refused before anything is claimed or sent, the row stays PENDING
with a message saying why, the other rows go on, and the next read of the table sends the new
image, once. Both dialects build image bodies; both are covered, against a real emulator and a
real ledger (SQLite and PostgreSQL).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import TEST_API_KEY
from faultkit import submit

from kvid_dagster.client import (
    ApiDialect,
    KvidClient,
    KvidValidationError,
    LocalImage,
    build_request,
)
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.core.submit import SubmitAction, register_table
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus

IMAGES = Path(__file__).resolve().parent.parent / "data" / "images"
IMAGE_A = IMAGES / "tiger.jpg"
IMAGE_B = IMAGES / "salmon_dish.jpg"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_image_table(folder: Path) -> Path:
    """Two text rows around an image row whose image is ``cat.jpg`` beside the table."""
    shutil.copyfile(IMAGE_A, folder / "cat.jpg")
    table = folder / "prompts.csv"
    table.write_text(
        "prompt_id,prompt,image,resolution\n"
        "first,A quiet harbour at dawn,,480p\n"
        "cat,The cat blinks slowly,cat.jpg,480p\n"
        "last,A windmill turning in the wind,,480p\n",
        encoding="utf-8",
    )
    return table


@pytest.mark.parametrize("dialect", list(ApiDialect))
def test_an_image_replaced_before_its_generate_is_not_sent_and_the_new_one_is_paid_once(
    dialect: ApiDialect, emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    table_path = write_image_table(tmp_path)
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    table = load_prompt_table(table_path, dialect=dialect)
    assert table.invalid == []
    register_table(ledger, table)
    shutil.copyfile(IMAGE_B, tmp_path / "cat.jpg")  # replaced while the run had not sent it yet

    first = {
        o.partition_key: o for o in submit(emulator.base_url, ledger, table.rows, dialect=dialect)
    }
    assert first["first"].action is SubmitAction.SUBMITTED
    assert first["last"].action is SubmitAction.SUBMITTED
    cat = first["cat"]
    assert (cat.action, cat.status) == (SubmitAction.ERROR, VideoStatus.PENDING), cat
    assert "image=" in cat.message and "changed since" in cat.message, cat.message
    assert "not sent" in cat.message
    assert emulator.jobs_created == 2  # the two text rows; nothing for the image row
    assert all(job.image_sha256 is None for job in emulator.jobs.values())
    row = ledger.row("cat")
    assert row is not None and row.status is VideoStatus.PENDING  # as the outcome says

    table = load_prompt_table(table_path, dialect=dialect)  # the next read: image B's request
    register_table(ledger, table)
    second = {
        o.partition_key: o for o in submit(emulator.base_url, ledger, table.rows, dialect=dialect)
    }
    assert second["cat"].action is SubmitAction.SUBMITTED
    assert second["first"].action is second["last"].action is SubmitAction.SKIPPED
    third = submit(emulator.base_url, ledger, table.rows, dialect=dialect)
    assert {o.action for o in third} == {SubmitAction.SKIPPED}
    images = [job.image_sha256 for job in emulator.jobs.values() if job.image_sha256]
    assert images == [sha256(IMAGE_B)]  # B, sent exactly once
    assert emulator.jobs_created == 3


@pytest.mark.parametrize("dialect", list(ApiDialect))
def test_a_request_reads_its_image_once_and_sends_only_those_bytes(
    dialect: ApiDialect, tmp_path: Path
) -> None:
    image = tmp_path / "cat.jpg"
    shutil.copyfile(IMAGE_A, image)
    request = build_request("The cat blinks", dialect=dialect, image=image)
    held = request.image
    assert isinstance(held, LocalImage)
    assert (held.path, held.sha256, held.size) == (image, sha256(IMAGE_A), IMAGE_A.stat().st_size)
    assert Path(held) == image  # still a path to code that opens it
    sent = base64.b64decode(request.to_body()["image_file"])
    assert sent == IMAGE_A.read_bytes()
    before = request.canonical_hash()

    shutil.copyfile(IMAGE_B, image)
    assert request.canonical_hash() == before  # the hash is of what was read, never re-read
    with pytest.raises(KvidValidationError, match="changed since") as caught:
        request.to_body()
    assert caught.value.field == "image"
    assert str(image) in str(caught.value)
    fresh = build_request("The cat blinks", dialect=dialect, image=image)
    assert fresh.canonical_hash() != before  # B is another request
    assert base64.b64decode(fresh.to_body()["image_file"]) == IMAGE_B.read_bytes()

    image.unlink()
    assert fresh.canonical_hash()  # hashing needs no file
    with pytest.raises(KvidValidationError, match="can no longer be read"):
        fresh.to_body()


def test_the_blocking_client_sends_nothing_for_a_replaced_image(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    image = tmp_path / "cat.jpg"
    shutil.copyfile(IMAGE_A, image)
    request = build_request("The cat blinks", image=image, resolution="480p")
    shutil.copyfile(IMAGE_B, image)
    client = KvidClient(TEST_API_KEY, emulator.base_url)
    with client, pytest.raises(KvidValidationError, match="changed since"):
        client.generate(request)
    assert emulator.stats.get("generate", 0) == 0
