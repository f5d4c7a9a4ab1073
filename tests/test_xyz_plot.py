"""``generate --xyz-x/-y/-z``: A1111's "X/Y/Z plot" script (``scripts/xyz_grid.py``, A1111 1.10 / Forge) — its value
parsing, prompt axes, cell order and grid drawing against A1111's functions transcribed here, and the cells against
their own runs."""

from __future__ import annotations

import math
import re
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.images import decode_png, read_png_text
from sdadapt.jobs.generate_xyz import XyzRun, xyz_cell_settings
from sdadapt.labelled_grid import annotate_grid, cells_grid
from sdadapt.xyz_plot import (
    XYZ_AXES,
    axis_label,
    axis_values,
    cell_order,
    csv_values,
    find_axis,
    prompt_order,
    prompt_sr,
)

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw, ImageFont, features

# ---------------------------------------------------------------- A1111 1.10 transcribed (scripts/xyz_grid.py)
re_range = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
re_range_float = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)"
                            r"(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
re_range_count = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
re_range_count_float = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)"
                                  r"(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def _a1111_process_axis(kind, vals):
    import csv
    from io import StringIO
    from itertools import chain

    valslist = list(map(str.strip, chain.from_iterable(csv.reader(StringIO(vals), skipinitialspace=True))))
    if kind is int:
        valslist_ext = []
        for val in valslist:
            if val.strip() == '':
                continue
            m = re_range.fullmatch(val)
            mc = re_range_count.fullmatch(val)
            if m is not None:
                start = int(m.group(1))
                end = int(m.group(2)) + 1
                step = int(m.group(3)) if m.group(3) is not None else 1
                valslist_ext += list(range(start, end, step))
            elif mc is not None:
                start = int(mc.group(1))
                end = int(mc.group(2))
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                valslist_ext += [int(x) for x in np.linspace(start=start, stop=end, num=num).tolist()]
            else:
                valslist_ext.append(val)
        valslist = valslist_ext
    elif kind is float:
        valslist_ext = []
        for val in valslist:
            if val.strip() == '':
                continue
            m = re_range_float.fullmatch(val)
            mc = re_range_count_float.fullmatch(val)
            if m is not None:
                start = float(m.group(1))
                end = float(m.group(2))
                step = float(m.group(3)) if m.group(3) is not None else 1
                valslist_ext += np.arange(start, end + step, step).tolist()
            elif mc is not None:
                start = float(mc.group(1))
                end = float(mc.group(2))
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                valslist_ext += np.linspace(start=start, stop=end, num=num).tolist()
            else:
                valslist_ext.append(val)
        valslist = valslist_ext
    elif kind == "permutations":
        valslist = list(permutations(valslist))
        return valslist
    return [kind(x) for x in valslist]


class _P:
    def __init__(self, prompt, negative_prompt=""):
        self.prompt, self.negative_prompt = prompt, negative_prompt


def _a1111_apply_prompt(p, x, xs):
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)


def _a1111_apply_order(p, x, xs):
    token_order = []
    for token in x:
        token_order.append((p.prompt.find(token), token))
    token_order.sort(key=lambda t: t[0])
    prompt_parts = []
    for _, token in token_order:
        n = p.prompt.find(token)
        prompt_parts.append(p.prompt[0:n])
        p.prompt = p.prompt[n + len(token):]
    prompt_tmp = ""
    for idx, part in enumerate(prompt_parts):
        prompt_tmp += part
        prompt_tmp += x[idx]
    p.prompt = prompt_tmp + p.prompt


def _a1111_cell_order(xs, ys, zs, x_cost, y_cost, z_cost):
    first_axes_processed, second_axes_processed = 'z', 'y'
    if x_cost > y_cost and x_cost > z_cost:
        first_axes_processed = 'x'
        second_axes_processed = 'y' if y_cost > z_cost else 'z'
    elif y_cost > x_cost and y_cost > z_cost:
        first_axes_processed = 'y'
        second_axes_processed = 'x' if x_cost > z_cost else 'z'
    elif z_cost > x_cost and z_cost > y_cost:
        first_axes_processed = 'z'
        second_axes_processed = 'x' if x_cost > y_cost else 'y'
    cells = []
    if first_axes_processed == 'x':
        for ix in range(xs):
            if second_axes_processed == 'y':
                cells += [(ix, iy, iz) for iy in range(ys) for iz in range(zs)]
            else:
                cells += [(ix, iy, iz) for iz in range(zs) for iy in range(ys)]
    elif first_axes_processed == 'y':
        for iy in range(ys):
            if second_axes_processed == 'x':
                cells += [(ix, iy, iz) for ix in range(xs) for iz in range(zs)]
            else:
                cells += [(ix, iy, iz) for iz in range(zs) for ix in range(xs)]
    else:
        for iz in range(zs):
            if second_axes_processed == 'x':
                cells += [(ix, iy, iz) for ix in range(xs) for iy in range(ys)]
            else:
                cells += [(ix, iy, iz) for iy in range(ys) for ix in range(xs)]
    return cells


def _a1111_image_grid(imgs, rows):  # (modules/images.py image_grid, rows given, grid_background_color #ffffff)
    if rows > len(imgs):  # noqa: PLR1730 - A1111's lines
        rows = len(imgs)
    cols = math.ceil(len(imgs) / rows)
    w, h = map(max, zip(*(img.size for img in imgs)))
    grid = Image.new('RGB', size=(cols * w, rows * h), color=(255, 255, 255))
    for i, img in enumerate(imgs):
        img_w, img_h = img.size
        w_offset, h_offset = 0 if img_w == w else (w - img_w) // 2, 0 if img_h == h else (h - img_h) // 2
        grid.paste(img, box=(i % cols * w + w_offset, i // cols * h + h_offset))
    return grid


class GridAnnotation:
    def __init__(self, text="", is_active=True):
        self.text = text
        self.is_active = is_active
        self.size = None


def _a1111_draw_grid_annotations(im, width, height, hor_texts, ver_texts, margin=0):
    color_active, color_inactive, color_background = (0, 0, 0), (153, 153, 153), (255, 255, 255)

    def get_font(fontsize):  # (A1111: ImageFont.truetype(opts.font or Roboto, fontsize); the same font here)
        return ImageFont.load_default(size=max(fontsize, 1))

    def wrap(drawing, text, font, line_length):
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if drawing.textlength(line, font=font) <= line_length:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    def draw_texts(drawing, draw_x, draw_y, lines, initial_fnt, initial_fontsize):
        for line in lines:
            fnt = initial_fnt
            fontsize = initial_fontsize
            while True:
                bbox = drawing.multiline_textbbox((0, 0), line.text, font=fnt)
                if (bbox[2] - bbox[0]) > line.allowed_width and fontsize > 0:
                    fontsize -= 1
                    fnt = get_font(fontsize)
                else:
                    break
            drawing.multiline_text((draw_x, draw_y + line.size[1] / 2), line.text, font=fnt,
                                   fill=color_active if line.is_active else color_inactive, anchor="mm", align="center")
            if not line.is_active:
                drawing.line((draw_x - line.size[0] // 2, draw_y + line.size[1] // 2, draw_x + line.size[0] // 2,
                              draw_y + line.size[1] // 2), fill=color_inactive, width=4)
            draw_y += line.size[1] + line_spacing

    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    fnt = get_font(fontsize)
    pad_left = 0 if sum([sum([len(line.text) for line in lines]) for lines in ver_texts]) == 0 else width * 3 // 4
    cols = im.width // width
    rows = im.height // height
    calc_img = Image.new("RGB", (1, 1), color_background)
    calc_d = ImageDraw.Draw(calc_img)
    for texts, allowed_width in zip(hor_texts + ver_texts, [width] * len(hor_texts) + [pad_left] * len(ver_texts)):
        items = [] + texts
        texts.clear()
        for line in items:
            wrapped = wrap(calc_d, line.text, fnt, allowed_width)
            texts += [GridAnnotation(x, line.is_active) for x in wrapped]
        for line in texts:
            bbox = calc_d.multiline_textbbox((0, 0), line.text, font=fnt)
            line.size = (bbox[2] - bbox[0], bbox[3] - bbox[1])
            line.allowed_width = allowed_width
    hor_text_heights = [sum([line.size[1] + line_spacing for line in lines]) - line_spacing for lines in hor_texts]
    ver_text_heights = [sum([line.size[1] + line_spacing for line in lines]) - line_spacing * len(lines)
                        for lines in ver_texts]
    pad_top = 0 if sum(hor_text_heights) == 0 else max(hor_text_heights) + line_spacing * 2
    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       color_background)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    d = ImageDraw.Draw(result)
    for col in range(cols):
        x = pad_left + (width + margin) * col + width / 2
        y = pad_top / 2 - hor_text_heights[col] / 2
        draw_texts(d, x, y, hor_texts[col], fnt, fontsize)
    for row in range(rows):
        x = pad_left / 2
        y = pad_top + (height + margin) * row + height / 2 - ver_text_heights[row] / 2
        draw_texts(d, x, y, ver_texts[row], fnt, fontsize)
    return result


# ---------------------------------------------------------------------------------------------------- tests
_PIECES = st.sampled_from(["1-5", "1-9 (+2)", "10-1 (-3)", "0-1 [5]", "0.5-1.5 (+0.5)", "2-8 [4]", " 7 ", "-3",
                           "1.25", "0-2", "", "+ 2-4", "1.5-3 [3]", "3-3"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=4), st.sampled_from(["int", "float"]))
def test_number_values_read_as_a1111s_process_axis_reads_them(pieces, kind):
    text = ", ".join(pieces)
    axis = find_axis("Steps" if kind == "int" else "CFG Scale")
    try:
        expected = _a1111_process_axis(int if kind == "int" else float, text)
    except ValueError:
        with pytest.raises(ValueError):
            axis_values(axis, text)
        return
    if not expected:
        with pytest.raises(ValueError, match="no values"):
            axis_values(axis, text)
        return
    got = axis_values(axis, text)
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected]


def test_text_values_keep_quoted_commas_and_permutations_are_every_order():
    assert csv_values('a cat, "on, a mat",  dog ') == ["a cat", "on, a mat", "dog"]
    assert axis_values(find_axis("prompt s/r"), 'cat, "dog, big"') == ["cat", "dog, big"]
    assert axis_values(find_axis("Prompt order"), "a, b, c") == _a1111_process_axis("permutations", "a, b, c")
    assert axis_values(find_axis("Nothing"), "whatever") == [0]
    with pytest.raises(ValueError, match="is no whole number"):
        axis_values(find_axis("Steps"), "10, twenty")


def test_axis_types_by_label_and_the_ones_not_run_here_say_why():
    assert find_axis("cfg  scale") is XYZ_AXES["CFG Scale"]
    with pytest.raises(ValueError, match="face restoration"):
        find_axis("Face restore")
    with pytest.raises(ValueError, match="no such axis type"):
        find_axis("Zoom")


_WORDS = st.sampled_from(["cat", "dog", "red", "a", "on", "mat", "red cat", ",", " "])


@settings(max_examples=200, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=8), st.lists(_WORDS, min_size=1, max_size=3, unique=True),
       st.sampled_from(["", "dog", "ugly cat"]))
def test_prompt_axes_are_a1111s(words, values, negative):
    prompt = " ".join(words)
    for value in values:  # Prompt S/R: the first value replaced by each
        p = _P(prompt, negative)
        try:
            _a1111_apply_prompt(p, value, values)
        except RuntimeError as exc:
            with pytest.raises(ValueError, match=re.escape(str(exc))):
                prompt_sr(prompt, negative, value, values[0])
            continue
        assert prompt_sr(prompt, negative, value, values[0]) == (p.prompt, p.negative_prompt)
    present = [value for value in values if value in prompt]
    for order in permutations(present):  # Prompt order: the pieces found, in each order
        p = _P(prompt)
        _a1111_apply_order(p, order, None)
        assert prompt_order(prompt, order) == p.prompt


@settings(max_examples=100, deadline=None)
@given(st.tuples(*[st.integers(1, 3)] * 3), st.tuples(*[st.sampled_from([0.0, 0.5, 0.7, 1.0])] * 3))
def test_cells_run_in_a1111s_order(lengths, costs):
    assert cell_order(lengths, costs) == _a1111_cell_order(*lengths, *costs)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(4, 20), st.integers(4, 20)), min_size=1, max_size=7), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_image_grid_is_a1111s(sizes, rows, seed):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    expected = np.asarray(_a1111_image_grid([Image.fromarray(image) for image in images], rows))
    assert np.array_equal(cells_grid(images, rows=rows), expected)


@pytest.mark.parametrize(("cell", "hor", "ver", "margin"), [
    ((64, 64), ["Steps: 10", "Steps: 20", "Steps: 30"], ["CFG Scale: 5.0", "CFG Scale: 7.5"], 0),
    ((96, 64), ["a very long label that has to wrap over several lines", "x"], [""], 6),
    ((128, 128), ["Sampler"], ["Euler a", "DPM++ 2M Karras with a long tail of words"], 10),
    ((48, 80), ["", ""], ["", ""], 4),
    ((64, 96), [[("a cat", False), ("on a mat", False)], [("a cat", True), ("on a mat", False)]],
     [[("in the snow at night", True)], [("in the snow at night", False)]], 2),  # (a prompt matrix's)
])
def test_the_legend_is_laid_out_as_a1111_lays_it_out(cell, hor, ver, margin):
    if not features.check("freetype2"):
        pytest.skip("Pillow without FreeType: no scalable default font")
    width, height = cell
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (height * len(ver), width * len(hor), 3), dtype=np.uint8)
    def annotations(labels):
        return [[GridAnnotation(label)] if isinstance(label, str) else [GridAnnotation(*line) for line in label]
                for label in labels]

    expected = _a1111_draw_grid_annotations(Image.fromarray(grid), width, height, annotations(hor), annotations(ver),
                                            margin)
    got = annotate_grid(grid, width, height, hor, ver, margin=margin)
    assert got.shape == np.asarray(expected).shape and np.array_equal(got, np.asarray(expected))


def test_legend_texts_are_a1111s():
    assert axis_label(XYZ_AXES["Steps"], 20) == "Steps: 20"
    assert axis_label(XYZ_AXES["CFG Scale"], 0.1 + 0.2) == "CFG Scale: 0.3"  # (round(x, 8))
    assert axis_label(XYZ_AXES["Sampler"], "Euler a") == "Euler a"
    assert axis_label(XYZ_AXES["Prompt order"], ("b", "a")) == "b, a"
    assert axis_label(XYZ_AXES["Checkpoint name"], "/models/sd15.safetensors") == "sd15.safetensors"
    assert axis_label(XYZ_AXES["Nothing"], 0) == ""


def test_a_cells_settings_and_what_is_refused(tmp_path):
    given_ = {"prompt": "a red cat", "negative": "", "model": "toy", "out": "x.png"}
    cell = {}
    for label, value, values in (("Prompt S/R", "blue", ["red", "blue"]), ("Size", "64x48", None),
                                 ("RNG source", "NV", None), ("Schedule type", "Karras", None),
                                 ("Always discard next-to-last sigma", "True", None),
                                 ("SGM noise multiplier", "False", None)):
        cell.update(xyz_cell_settings(XYZ_AXES[label], value, values or [value], {**given_, **cell}))
    assert cell == {"prompt": "a blue cat", "negative": "", "width": 64, "height": 48, "noise": "a1111-nv",
                    "schedule": "karras", "always_discard_next_to_last_sigma": True, "sgm_noise_multiplier": False}
    hires = {**given_, "hires_scale": 2.0}
    assert xyz_cell_settings(XYZ_AXES["Denoising"], 0.4, [0.4], hires) == {"hires_denoising": 0.4}
    assert xyz_cell_settings(XYZ_AXES["Denoising"], 0.4, [0.4], {**given_, "init_image": "i.png"}) == \
        {"denoising_strength": 0.4}
    assert xyz_cell_settings(XYZ_AXES["Hires upscaler"], "Latent (bicubic antialiased)", [], hires) == \
        {"hires_upscaler": "latent-bicubic-antialiased"}
    (tmp_path / "4x-Sharp.pth").write_bytes(b"")  # (an ESRGAN file: its path kept, loaded by the cell's run)
    assert xyz_cell_settings(XYZ_AXES["Hires upscaler"], str(tmp_path / "4x-Sharp.pth"), [], hires) == \
        {"hires_upscaler": str(tmp_path / "4x-Sharp.pth")}
    with pytest.raises(ValueError, match="no such file"):
        xyz_cell_settings(XYZ_AXES["Hires upscaler"], str(tmp_path / "none.pth"), [], hires)
    for label, value, settings_, message in (
            ("Denoising", 0.5, given_, "no denoising strength"), ("Hires steps", 5, given_, "hires fix"),
            ("Var. seed", 3, given_, "--noise a1111"), ("Refiner switch at", 0.5, given_, "no --refiner"),
            ("Sampler", "Bogus", given_, "Bogus"), ("Size", "big", given_, "no size"),
            ("RNG source", "TPU", given_, "GPU, CPU and NV"), ("Checkpoint name", "nope", given_, "no such file")):
        with pytest.raises(ValueError, match=message):
            xyz_cell_settings(XYZ_AXES[label], value, [value], settings_)
    with pytest.raises(ValueError, match="--xyz-y 'Prompt S/R': Prompt S/R did not find dog"):
        XyzRun([("Steps", "1-2"), ("Prompt S/R", "dog, cat")], given_)
    with pytest.raises(ValueError, match="'Steps' on two axes"):
        XyzRun([("Steps", "1-2"), ("steps", "3")], given_)


def _pixels(path):
    return decode_png(path.read_bytes())[..., :3]


def test_every_cell_is_its_own_runs_image_and_the_grid_is_theirs(tmp_path, capsys):
    base = ["generate", "--model", "toy", "--prompt", "a red circle", "--negative", "red square", "--seed", "3"]
    assert main([*base, "--xyz-x", "Steps", "2-4 (+2)", "--xyz-y", "Prompt S/R", "red, blue", "--xyz-z",
                 "CFG Scale", "2, 4.5", "--xyz-no-legend", "--xyz-sub-grids", "-q", "-o", str(tmp_path / "g.png")]) == 0
    cells = []
    for iz, guidance in enumerate(("2", "4.5")):
        for iy, color in enumerate(("red", "blue")):
            for ix, steps in enumerate(("2", "4")):
                k = ix + 2 * iy + 4 * iz
                own = tmp_path / f"own{k}.png"
                assert main(["generate", "--model", "toy", "--prompt", f"a {color} circle", "--negative",
                             f"{color} square", "--seed", "3", "--steps", steps, "--guidance", guidance, "-q",
                             "-o", str(own)]) == 0
                assert (tmp_path / f"g-{k:02d}.png").read_bytes() == own.read_bytes(), k
                cells.append(_pixels(own))
    subs = [cells_grid(cells[:4], rows=2), cells_grid(cells[4:], rows=2)]
    assert np.array_equal(_pixels(tmp_path / "g.png"), cells_grid(subs, rows=1))
    assert np.array_equal(_pixels(tmp_path / "g-z01.png"), subs[1])
    text = read_png_text(tmp_path / "g.png")["parameters"]
    cell_text = read_png_text(tmp_path / "g-00.png")["parameters"]
    assert text == cell_text.replace(", Version:", ", Script: X/Y/Z plot, X Type: Steps, X Values: 2-4 (+2), Y Type: "
                                                   'Prompt S/R, Y Values: "red, blue", Z Type: CFG Scale, Z Values: '
                                                   '"2, 4.5", Version:')
    assert "Z Type" not in read_png_text(tmp_path / "g-z00.png")["parameters"]


def test_seeds_drawn_once_kept_per_cell_or_varied(tmp_path, capsys):
    base = ["generate", "--model", "toy", "--prompt", "a ring", "--steps", "1", "--xyz-no-legend"]

    def seeds(stem, n):
        return [int(re.search(r"Seed: (\d+)", read_png_text(tmp_path / f"{stem}-{k:02d}.png")["parameters"])[1])
                for k in range(n)]

    assert main([*base, "--seed", "-1", "--xyz-x", "Steps", "1, 1, 1", "-o", str(tmp_path / "a.png")]) == 0
    assert len(set(seeds("a", 3))) == 1 and "for every cell" in capsys.readouterr().err
    # A1111's fix_seed fixes the variation seed too: one for the grid (each cell drew its own)
    assert main([*base, "--seed", "3", "--noise", "a1111-cpu", "--subseed", "-1", "--subseed-strength", "0.3",
                 "--xyz-x", "Steps", "1, 1, 1",
                 "-o", str(tmp_path / "w.png")]) == 0
    variation = [re.search(r"Variation seed: (\d+)", read_png_text(tmp_path / f"w-{k:02d}.png")["parameters"])[1]
                 for k in range(3)]
    assert len(set(variation)) == 1 and "--subseed -1: drew" in capsys.readouterr().err, variation
    assert main([*base, "--seed", "10", "--xyz-x", "Steps", "1-3", "--xyz-y", "CFG Scale", "1, 2", "--xyz-vary-seeds",
                 "x", "y", "-q", "-o", str(tmp_path / "v.png")]) == 0
    assert seeds("v", 6) == [10, 11, 12, 13, 14, 15]
    assert main([*base, "--seed", "10", "--xyz-x", "Seed", "5, -1", "-o", str(tmp_path / "s.png")]) == 0
    drawn = seeds("s", 2)
    assert drawn[0] == 5 and f"Fixed X Values: \"5, {drawn[1]}\"" in read_png_text(tmp_path / "s.png")["parameters"]


def test_nothing_runs_when_an_axis_or_an_output_is_wrong(tmp_path, capsys):
    base = ["generate", "--model", "toy", "--prompt", "a ring", "--steps", "1", "-o", str(tmp_path / "g.png")]
    assert main([*base, "--xyz-x", "Prompt S/R", "cat, dog"]) == 2
    assert "Prompt S/R did not find cat" in capsys.readouterr().err
    assert main([*base, "--xyz-x", "Styles", "a"]) == 2
    assert "styles.csv" in capsys.readouterr().err
    (tmp_path / "g-01.png").write_bytes(b"mine")
    assert main([*base, "--xyz-x", "Steps", "1, 2"]) == 8
    assert not (tmp_path / "g-00.png").exists() and (tmp_path / "g-01.png").read_bytes() == b"mine"
    assert main([*base, "--xyz-x", "Steps", "1, 2", "--prompts-file", str(tmp_path / "p.txt")]) == 2
    assert "two of A1111's scripts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--grid-margin", "4"])
    assert "--xyz-x (-y, -z) or --prompt-matrix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--xyz-sub-grids"])
    assert "--xyz-x, --xyz-y or --xyz-z" in capsys.readouterr().err


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "axis_values(")


def test_a_checkpoint_axis_loads_each_model_once_and_runs_it_outermost(tmp_path, monkeypatch):
    import torch

    from sdadapt.jobs import loaded_models
    from sdadapt.toy import load_toy, save_toy

    (tmp_path / "models").mkdir()
    base = tmp_path / "models" / "base.safetensors"
    save_toy(load_toy(), base, dtype=torch.float32)
    other = load_toy()
    with torch.no_grad():
        for parameter in other.unet.parameters():
            parameter.mul_(1.05)
    save_toy(other, tmp_path / "models" / "other_v2.safetensors", dtype=torch.float32)
    loads = []
    real = loaded_models.load_system
    monkeypatch.setattr(loaded_models, "load_system", lambda model, **k: loads.append(model) or real(model, **k))
    assert main(["generate", "--model", str(base), "--prompt", "a red circle", "--seed", "2", "--xyz-x", "Steps",
                 "1, 2", "--xyz-y", "Checkpoint name", "other, base", "--xyz-no-legend", "-q",
                 "-o", str(tmp_path / "g.png")]) == 0
    assert [Path(model).name for model in loads] == ["other_v2.safetensors", "base.safetensors"]  # (y outermost)
    for k, (steps, model) in enumerate([("1", "other_v2"), ("2", "other_v2"), ("1", "base"), ("2", "base")]):
        assert main(["generate", "--model", str(tmp_path / "models" / f"{model}.safetensors"), "--prompt",
                     "a red circle", "--seed", "2", "--steps", steps, "-q", "-o", str(tmp_path / f"own{k}.png")]) == 0
        assert np.array_equal(_pixels(tmp_path / f"g-{k:02d}.png"), _pixels(tmp_path / f"own{k}.png")), k
    assert not np.array_equal(_pixels(tmp_path / "g-00.png"), _pixels(tmp_path / "g-02.png"))


def test_an_axis_is_checked_on_the_run_the_other_axes_make():
    given_ = {"prompt": "a cat", "model": "toy", "out": "x.png"}
    XyzRun([("Var. strength", "0, 0.5"), ("RNG source", "CPU, GPU")], given_)  # (the noise from the other axis)
    with pytest.raises(ValueError, match="--xyz-x 'Var. strength': a variation seed is A1111's noise"):
        XyzRun([("Var. strength", "0, 0.5"), ("Steps", "1")], given_)
    from sdadapt.jobs.generate_xyz import run_xyz_plot

    with pytest.raises(ValueError, match="adds each cell's index to the -1"):
        run_xyz_plot([("Steps", "1, 2")], vary_seeds=["x"], keep_random_seeds=True, seed=-1, **given_)


def test_the_grids_infotext_makes_the_same_grid_again(tmp_path, capsys):
    base = ["generate", "--model", "toy", "--prompt", "a red circle", "--xyz-no-legend", "-q"]
    assert main([*base, "--seed", "3", "--steps", "2", "--xyz-x", "Seed", "-1, 7", "--xyz-y", "CFG Scale", "2, 3",
                 "-o", str(tmp_path / "g.png")]) == 0
    assert main(["generate", "--model", "toy", "--infotext", str(tmp_path / "g.png"), "--xyz-no-legend",
                 "-o", str(tmp_path / "again.png")]) == 0
    assert "not taken" not in capsys.readouterr().err
    for k in range(4):
        assert np.array_equal(_pixels(tmp_path / f"again-{k:02d}.png"), _pixels(tmp_path / f"g-{k:02d}.png")), k
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(tmp_path / "g.png"))
    assert main(["generate", "--model", "toy", "--infotext", str(tmp_path / "g-00.png"), "--xyz-sub-grids",
                 "-o", str(tmp_path / "one.png")]) == 2
    assert "has no X/Y/Z axes" in capsys.readouterr().err


def test_a_batch_cell_is_its_batch_grid(tmp_path):
    """A1111's cell is ``processed.images[0]``: with two or more images the batch grid ``process_images`` returns
    first (xyz_grid.py:344; processing.py:1125-1134), so a 2x1 plot of count 4 is two 2x2 batch grids side by side."""
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.labelled_grid import cells_grid

    out = tmp_path / "g.png"
    assert main(["generate", "--model", "toy", "--prompt", "a ring", "--steps", "1", "--seed", "2", "--count", "4",
                 "--xyz-x", "Steps", "1, 2", "--xyz-no-legend", "-q", "-o", str(out)]) == 0
    cells = []
    for k in range(2):
        batch = [np.asarray(Image.open(tmp_path / f"g-{k:02d}-{i:02d}.png").convert("RGB")) for i in range(4)]
        cells.append(cells_grid(batch, rows=2))  # (round(sqrt(4)) rows: A1111's default)
    expected = cells_grid(cells, rows=1)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
