"""Queries shaped the way people search: a region of a picture, several pictures at once, more-like-this and
less-like-that feedback.

A crop of a composite picture finds the picture it was cut from (a PNG at distance ~0; a large JPEG, whose whole-
picture draft would shrink the region to 1/8, still first, because the region is decoded at the scale it needs, in
the pixels of the picture as shown after EXIF rotation); a query of several pictures is numpy's nearest neighbours
of the mean of their normalised vectors on every engine; a negative moves the query by the documented formula and
pictures like it down the list; mistakes are one line on the command line and a 422 from the API.

Crops are embedded by the real ResNet50 (seeded random weights); the rest use the fake extractor.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from ingest.collection import Collection
from ingest.images import INPUT_SIZE, decode_image, draft_size
from ingest.load import load_collection
from ingest.queries import ALPHA, GAMMA, Crop, Picture, compose
from ingest.reduce import normalize
from ingest.sources import walk_folder
from search.cli import cli as search_cli
from search.evaluation import brute_force
from search.searcher import stored_bytes
from search.serve import create_app
from tests.helpers import COLOURS, make_folder, make_picture

REGIONS, SHAPES, TAMPERED = "query-regions", "query-shapes", "query-shapes-tampered"
SIDE = 300  # the stored pictures of the real-model collection are 300 x 300


# --- collections -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regions(db, settings, extractor, tmp_path_factory):
    """Six 300 x 300 pictures embedded by the real model: (folder, collection, {label_i: id})."""
    root = tmp_path_factory.mktemp("regions") / "pics"
    for li, label in enumerate(("red", "green", "blue")):
        (root / label).mkdir(parents=True)
        for i in range(2):
            picture = make_picture(COLOURS[label], "circle" if li % 2 else "square", 700 + li * 10 + i, size=(SIDE, SIDE))
            picture.save(root / label / f"{label}_{i}.jpg", quality=92)
    load_collection(db, settings, REGIONS, walk_folder(root)[0], extractor, pca_dims=4, progress=False)
    coll = Collection.named(db, settings, REGIONS)
    ids = {p.stem: coll.query(image=p).image_id for p in sorted(root.glob("*/*.jpg"))}
    return root, coll, ids


@pytest.fixture(scope="module")
def shapes(db, settings, fake_extractor, tmp_path_factory):
    """4 labels x 4 pictures of the fake model, with an HNSW index too: (folder, collection, {stem: id})."""
    root = make_folder(tmp_path_factory.mktemp("shapes") / "pics", labels=tuple(COLOURS), per_label=4, seed=41)
    load_collection(db, settings, SHAPES, walk_folder(root)[0], fake_extractor, pca_dims=6, progress=False)
    coll = Collection.named(db, settings, SHAPES)
    coll.build_hnsw()
    ids = {p.stem: coll.query(image=p).image_id for p in sorted(root.glob("*/*.jpg"))}
    return root, coll, ids


@pytest.fixture(scope="module")
def client(shapes, db, settings):
    with TestClient(create_app(settings, db, collection=SHAPES, allowed_hosts=["testserver"])) as c:
        yield c


def similar(*args):
    return CliRunner().invoke(search_cli, ["similar", *args])


def similar_json(collection, *args):
    result = similar("-c", collection, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def decoded(path) -> Image.Image:
    """A stored JPEG's pixels as Pillow decodes them at full scale (what a composite is made of)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def smooth_canvas(width: int, height: int) -> Image.Image:
    """A large picture that compresses like a photo: gradients, no noise."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    rgb = np.stack([60 + 120 * x + 0 * y, 80 + 100 * y + 0 * x, 160 - 80 * x * y], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, **options)
    return out.getvalue()


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def detail_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two pictures' fine detail is: the correlation of their differences between neighbouring pixels."""
    grey = lambda p: np.diff(p.astype(np.float32).mean(axis=2), axis=1).ravel()  # noqa: E731
    return float(np.corrcoef(grey(a), grey(b))[0, 1])


# --- a region of a picture (the real model) --------------------------------------------------------


def test_a_crop_of_a_png_composite_finds_the_picture_it_was_cut_from_at_distance_zero(regions, tmp_path):
    root, _, ids = regions
    canvas = smooth_canvas(1200, 900)
    canvas.paste(decoded(root / "green" / "green_1.jpg"), (517, 203))
    canvas.paste(decoded(root / "red" / "red_0.jpg"), (100, 450))
    canvas.save(composite := tmp_path / "room.png")

    answer = similar_json(REGIONS, str(composite), "--crop", f"517,203,{SIDE},{SIDE}", "-k", "3")
    assert answer["hits"][0]["id"] == ids["green_1"]
    assert answer["hits"][0]["distance"] == pytest.approx(0, abs=1e-3)
    assert answer["query"]["crop"] == {"of": str(composite.absolute()), "x": 517, "y": 203, "w": SIDE, "h": SIDE}
    assert answer["query"]["positives"] == [str(composite.absolute())] and answer["query"]["negatives"] == []

    other = similar_json(REGIONS, str(composite), "--crop", f"100,450,{SIDE},{SIDE}", "-k", "1")
    assert other["hits"][0]["id"] == ids["red_0"]


def test_a_crop_of_a_large_jpeg_finds_the_picture_it_was_cut_from_first(regions, tmp_path):
    """4000 x 3000: the whole picture's draft is 1/8 scale, where a 300 px region would be 37 px upscaled."""
    root, _, ids = regions
    canvas = smooth_canvas(4000, 3000)
    places = {"blue_0": (2011, 1499), "red_1": (301, 2203), "green_0": (3600, 40)}
    for stem, at in places.items():
        canvas.paste(decoded(next(root.glob(f"*/{stem}.jpg"))), at)
    (composite := tmp_path / "street.jpg").write_bytes(jpeg_bytes(canvas))
    with Image.open(composite) as img:
        assert img.draft("RGB", draft_size(img.size))[1][2] == 500, "the whole picture decodes at 1/8"

    for stem, (x, y) in places.items():
        answer = similar_json(REGIONS, str(composite), "--crop", f"{x},{y},{SIDE},{SIDE}", "-k", "2")
        assert answer["hits"][0]["id"] == ids[stem], stem
        assert answer["hits"][0]["distance"] < answer["hits"][1]["distance"] / 2


def test_a_small_region_of_a_large_jpeg_is_decoded_at_full_scale(regions):
    """The region's pixels are the stored picture's, detail and all, not a 1/8 draft's upscaled."""
    root, _, _ = regions
    source = root / "blue" / "blue_1.jpg"
    canvas = smooth_canvas(4000, 3000)
    canvas.paste(decoded(source), (1203, 806))
    data = jpeg_bytes(canvas)
    region = (1203, 806, SIDE, SIDE)

    ours = decode_image(data, crop=region).pixels
    want = decode_image(source.read_bytes()).pixels
    with Image.open(io.BytesIO(data)) as img:  # what the whole picture's draft would give
        img.draft("RGB", (INPUT_SIZE, INPUT_SIZE))
        s = 4000 / img.width
        eighth = img.convert("RGB").crop(tuple(round(v / s) for v in (1203, 806, 1203 + SIDE, 806 + SIDE)))
        blurred = np.asarray(eighth.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR))
    assert mean_difference(ours, want) < 3
    assert detail_correlation(ours, want) > 0.9  # the noise of the picture's background is still there, pixel for pixel
    assert detail_correlation(blurred, want) < 0.3  # and gone from what the 1/8 draft would have given


@pytest.mark.parametrize("short, scale", [(300, 1), (460, 2), (1000, 4), (2000, 8)])
def test_the_draft_keeps_the_regions_short_side_at_224_or_more(short, scale):
    width, height = 4000, 3000
    data = jpeg_bytes(smooth_canvas(width, height))
    with Image.open(io.BytesIO(data)) as img:
        box = img.draft("RGB", draft_size(img.size, (0, 0, short, short + 50)))[1]
    assert width / box[2] == scale and short / scale >= INPUT_SIZE


def test_a_crop_is_in_pixels_of_the_picture_as_shown_after_exif_rotation(regions, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6: the crop is of the upright 2000 x 3000 picture."""
    root, _, ids = regions
    upright = smooth_canvas(2000, 3000)
    upright.paste(decoded(root / "red" / "red_1.jpg"), (1500, 2600))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote it: 3000 x 2000
    (photo := tmp_path / "phone.jpg").write_bytes(jpeg_bytes(sideways, exif=exif.tobytes()))

    want = decode_image((root / "red" / "red_1.jpg").read_bytes()).pixels
    assert mean_difference(decode_image(photo.read_bytes(), crop=(1500, 2600, SIDE, SIDE)).pixels, want) < 3
    answer = similar_json(REGIONS, str(photo), "--crop", f"1500,2600,{SIDE},{SIDE}", "-k", "1")
    assert answer["hits"][0]["id"] == ids["red_1"]
    refused = similar("-c", REGIONS, str(photo), "--crop", f"2600,1500,{SIDE},{SIDE}")  # inside only if not turned
    assert refused.exit_code == 1 and "not inside the 2000x3000 picture" in refused.output


# --- several pictures, and feedback (the fake model) -----------------------------------------------


def embeddings(coll, *id_lists):
    ids, vectors = coll.read_vectors()
    rows = {int(i): v for i, v in zip(ids, vectors)}
    return ids, vectors, [np.stack([rows[i] for i in wanted]) for wanted in id_lists]


def rocchio_by_hand(pos: np.ndarray, neg: np.ndarray | None = None) -> np.ndarray:
    """The documented formula, written out again: scale * (1 * mean of unit positives - 0.5 * mean of unit negatives)."""
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    q = 1.0 * unit(pos).mean(axis=0) - (0 if neg is None else 0.5 * unit(neg).mean(axis=0))
    return np.linalg.norm(pos, axis=1).mean() * q


def exact_without(ids, vectors, q, k, leave_out):
    keep = ~np.isin(ids, list(leave_out))
    return brute_force(ids[keep], vectors[keep], q, k)


@pytest.mark.parametrize("engine", ["pgvector", "annoy", "hnsw"])
def test_several_pictures_search_with_their_mean_as_numpy_does(shapes, engine):
    _, coll, ids = shapes
    chosen = [ids["red_0"], ids["blue_2"], ids["green_1"]]
    all_ids, vectors, (pos,) = embeddings(coll, chosen)
    composed = compose(coll, [Picture(image_id=i) for i in chosen])
    q = rocchio_by_hand(pos)
    np.testing.assert_allclose(composed.query.vector, q, rtol=1e-5, atol=1e-6)
    hits = coll.similar(composed.query, 8, engine=engine, exclude=composed.exclude())
    want_ids, want_d = exact_without(all_ids, vectors, q, 8, chosen)
    assert [h.id for h in hits] == want_ids.tolist()  # 16 rows: the approximate engines find the exact answer
    np.testing.assert_allclose([h.distance for h in hits], want_d, rtol=1e-4, atol=1e-5)


def test_the_raw_space_mean_is_the_mean_of_normalised_features(shapes):
    _, coll, ids = shapes
    chosen = [ids["yellow_0"], ids["yellow_3"]]
    all_ids, raw = coll.read_vectors("raw")
    rows = {int(i): v for i, v in zip(all_ids, raw)}
    composed = compose(coll, [Picture(image_id=i) for i in chosen], space="raw")
    q = normalize(rocchio_by_hand(np.stack([rows[i] for i in chosen]))[np.newaxis])[0]
    hits = coll.similar(composed.query, 5, space="raw", exclude=composed.exclude())
    assert [h.id for h in hits] == exact_without(all_ids, normalize(raw), q, 5, chosen)[0].tolist()


def test_a_negative_moves_the_query_by_the_formula_and_pictures_like_it_drop(shapes):
    _, coll, ids = shapes
    positive, negative = ids["red_1"], ids["green_2"]
    all_ids, vectors, (pos, neg) = embeddings(coll, [positive], [negative])
    composed = compose(coll, [Picture(image_id=positive)], [Picture(image_id=negative)])
    np.testing.assert_allclose(composed.query.vector, rocchio_by_hand(pos, neg), rtol=1e-5, atol=1e-6)
    assert composed.to_dict()["weights"] == {"alpha": ALPHA, "gamma": GAMMA, "scale": pytest.approx(np.linalg.norm(pos))}
    assert (ALPHA, GAMMA) == (1.0, 0.5)

    before = [h.id for h in coll.similar(pos[0], 16, exclude=[positive, negative])]
    after = [h.id for h in coll.similar(composed.query, 16, exclude=composed.exclude())]
    assert sorted(before) == sorted(after) and len(after) == 14
    greens = [ids[f"green_{i}"] for i in (0, 1, 3)]
    nearest_to_negative = min(greens, key=lambda i: np.linalg.norm(vectors[all_ids == i][0] - neg[0]))
    assert after.index(nearest_to_negative) > before.index(nearest_to_negative)
    assert sum(map(after.index, greens)) > sum(map(before.index, greens))


def test_a_stored_id_and_a_new_file_make_one_query(shapes, tmp_path):
    _, coll, ids = shapes
    new = tmp_path / "new.png"
    make_picture(COLOURS["blue"], "circle", seed=4242).save(new)
    answer = similar_json(SHAPES, str(new), "--id", str(ids["blue_1"]), "-k", "5")
    assert answer["query"]["positives"] == [str(new.absolute()), ids["blue_1"]]
    assert answer["query"]["negatives"] == [] and answer["query"]["crop"] is None
    assert answer["query"]["weights"]["alpha"] == 1.0 and answer["query"]["weights"]["gamma"] == 0.5

    all_ids, vectors, (stored,) = embeddings(coll, [ids["blue_1"]])
    q = rocchio_by_hand(np.stack([coll.query(image=new).vector, stored[0]]))
    assert [h["id"] for h in answer["hits"]] == exact_without(all_ids, vectors, q, 5, [ids["blue_1"]])[0].tolist()

    negated = similar_json(SHAPES, str(new), "--not-id", str(ids["red_0"]), "-k", "20")
    assert negated["query"]["negatives"] == [ids["red_0"]] and ids["red_0"] not in [h["id"] for h in negated["hits"]]


def test_one_picture_is_searched_as_itself_and_exclusion_follows_the_query(shapes):
    root, coll, ids = shapes
    one = compose(coll, [Picture(path=root / "red" / "red_2.jpg")])
    alone = coll.query(image=root / "red" / "red_2.jpg")
    assert one.query.image_id == alone.image_id == ids["red_2"] and np.array_equal(one.query.vector, alone.vector)
    assert one.exclude() == () and one.single
    plain = similar_json(SHAPES, "--id", str(ids["red_2"]), "-k", "3")
    assert isinstance(plain, list) and plain[0]["id"] == ids["red_2"] and plain[0]["distance"] == pytest.approx(0, abs=1e-6)

    pair = [ids["red_2"], ids["red_3"]]
    left_out = similar_json(SHAPES, "--id", str(pair[0]), "--id", str(pair[1]), "-k", "16")
    assert not {h["id"] for h in left_out["hits"]} & set(pair) and len(left_out["hits"]) == 14
    kept = similar_json(SHAPES, "--id", str(pair[0]), "--id", str(pair[1]), "-k", "16", "--keep-self")
    assert set(pair) <= {h["id"] for h in kept["hits"]}
    excluded = similar_json(SHAPES, "--id", str(pair[0]), "-k", "3", "--exclude-self")
    assert pair[0] not in [h["id"] for h in excluded]


@pytest.mark.parametrize("args, error", [
    (["--crop", "1,2,3"], "a crop is X,Y,W,H in whole pixels"),
    (["--crop", "a,b,c,d"], "a crop is X,Y,W,H in whole pixels"),
    (["--crop", "0,0,0,40"], "the crop 0,0,0,40 is empty"),
    (["--crop", "0,0,10,10"], "is too small: at least 16 pixels a side"),
    (["--crop", "60,40,50,50"], "the crop 60,40,50,50 is not inside the 96x72 picture"),
    (["--crop", "-4,0,40,40"], "is not inside the 96x72 picture"),
    (["--id", "{blue_0}", "--not-id", "{blue_0}"], "is both a picture to search with and one to move away from"),
    (["--not-id", "{blue_0}"], "give either an image file or --id"),
])
def test_query_mistakes_are_one_line(shapes, args, error):
    root, _, ids = shapes
    args = [a.format(**ids) for a in args]
    picture = [] if "--id" in args or "--not-id" in args else [str(root / "red" / "red_0.jpg")]
    result = similar("-c", SHAPES, *picture, *args)
    assert result.exit_code in (1, 2) and error in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_crop_of_a_stored_image_by_id_is_decoded_from_its_file(shapes):
    _, coll, ids = shapes
    whole = similar_json(SHAPES, "--id", str(ids["green_3"]), "--crop", "0,0,96,72", "-k", "1")
    assert whole["hits"][0]["id"] == ids["green_3"] and whole["hits"][0]["distance"] == pytest.approx(0, abs=1e-4)
    assert whole["query"]["crop"] == {"of": ids["green_3"], "x": 0, "y": 0, "w": 96, "h": 72}
    part = compose(coll, [Picture(image_id=ids["green_3"], crop=Crop(10, 8, 60, 50))], read_stored=lambda i: stored_bytes(coll, i))
    assert part.query.image_id is None and part.stored == (ids["green_3"],)
    assert not np.allclose(part.query.vector, coll.query(image_id=ids["green_3"]).vector)


# --- the JSON API ----------------------------------------------------------------------------------


def test_api_search_by_id_with_a_crop(client, shapes):
    _, _, ids = shapes
    answer = client.get(f"/api/collections/{SHAPES}/images/{ids['blue_3']}/similar", params={"crop": "0,0,96,72", "k": 2}).json()
    assert answer["hits"][0]["id"] == ids["blue_3"] and answer["hits"][0]["distance"] == pytest.approx(0, abs=1e-4)
    assert answer["query"]["crop"] == {"of": ids["blue_3"], "x": 0, "y": 0, "w": 96, "h": 72} and answer["query"]["embedded"]


@pytest.mark.parametrize("crop, detail", [
    ("1,2", "a crop is X,Y,W,H"),
    ("0,0,8,8", "too small"),
    ("50,50,60,60", "not inside the 96x72 picture"),
])
def test_api_crop_mistakes_are_422(client, shapes, crop, detail):
    root, _, ids = shapes
    by_id = client.get(f"/api/collections/{SHAPES}/images/{ids['red_1']}/similar", params={"crop": crop})
    upload = client.post(f"/api/collections/{SHAPES}/similar", files={"image": ("q.jpg", (root / "red" / "red_1.jpg").read_bytes())},
                         data={"crop": crop})
    for response in (by_id, upload):
        assert response.status_code == 422 and detail in response.json()["detail"], response.text


def test_api_feedback_is_the_librarys_query_without_its_pictures(client, shapes):
    _, coll, ids = shapes
    positives, negatives = [ids["yellow_1"], ids["green_0"]], [ids["blue_0"]]
    answer = client.post(f"/api/collections/{SHAPES}/similar/feedback",
                         json={"positives": positives, "negatives": negatives, "k": 6, "engine": "annoy"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    composed = compose(coll, [Picture(image_id=i) for i in positives], [Picture(image_id=i) for i in negatives])
    want = coll.similar(composed.query, 6, exclude=positives + negatives)
    assert [h["id"] for h in body["hits"]] == [h.id for h in want]
    assert body["query"]["positives"] == positives and body["query"]["negatives"] == negatives
    assert body["query"]["weights"]["gamma"] == 0.5 and body["query"]["id"] is None


def test_api_upload_with_feedback_fields(client, shapes, tmp_path):
    root, coll, ids = shapes
    data = (root / "red" / "red_3.jpg").read_bytes()
    answer = client.post(f"/api/collections/{SHAPES}/similar", params={"k": 16},
                         files={"image": ("q.jpg", data)}, data={"positives": f"{ids['red_0']}", "negatives": f"{ids['yellow_2']}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"]["positives"] == [ids["red_3"], ids["red_0"]]  # the upload is stored: named by its id
    assert not {ids["red_3"], ids["red_0"], ids["yellow_2"]} & {h["id"] for h in body["hits"]}
    new = io.BytesIO()
    make_picture(COLOURS["green"], "circle", seed=99).save(new, "PNG")
    fresh = client.post(f"/api/collections/{SHAPES}/similar", files={"image": ("q.png", new.getvalue())}, data={"negatives": str(ids["red_0"])})
    assert fresh.json()["query"]["positives"] == ["upload"]


@pytest.mark.parametrize("body, status, detail", [
    ({"positives": []}, 422, "positives"),
    ({"positives": [1], "negatives": "x"}, 422, "negatives"),
    ({"positives": [10**20]}, 422, "positives"),
    ({"positives": [1], "extra": 1}, 422, "extra"),
    ({"positives": [987654321]}, 404, "no image with id 987654321"),
    ({"positives": [1], "engine": "faiss"}, 422, "unknown engine"),
])
def test_api_feedback_mistakes_are_4xx_with_one_line(client, body, status, detail):
    response = client.post(f"/api/collections/{SHAPES}/similar/feedback", json=body)
    assert response.status_code == status and detail in response.json()["detail"], response.text


def test_a_feedback_post_from_another_sites_page_is_refused(client, shapes):
    _, _, ids = shapes
    response = client.post(f"/api/collections/{SHAPES}/similar/feedback", json={"positives": [ids["red_0"]]},
                           headers={"Origin": "https://evil.example"})
    assert response.status_code == 403


def test_a_crop_of_a_stored_picture_whose_file_changed_is_refused(db, settings, fake_extractor, tmp_path):
    """No stored vector describes a region: the file is decoded, and only if it still hashes to the stored sha256."""
    root = make_folder(tmp_path / "pics", labels=("red", "blue"), per_label=2, seed=43)
    load_collection(db, settings, TAMPERED, walk_folder(root)[0], fake_extractor, pca_dims=2, progress=False)
    coll = Collection.named(db, settings, TAMPERED)
    target = root / "red" / "red_0.jpg"
    image_id = coll.query(image=target).image_id
    shutil.copy(root / "blue" / "blue_0.jpg", target)
    with TestClient(create_app(settings, db, collection=TAMPERED, allowed_hosts=["testserver"])) as c:
        response = c.get(f"/api/collections/{TAMPERED}/images/{image_id}/similar", params={"crop": "0,0,40,40"})
    assert response.status_code == 409 and "no longer the picture that was ingested" in response.json()["detail"]
    result = similar("-c", TAMPERED, "--id", str(image_id), "--crop", "0,0,40,40")
    assert result.exit_code == 1 and "no longer the picture that was ingested" in result.output
