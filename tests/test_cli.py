import subprocess
import sys

import pytest
import torch

from mmapload.cli import main, parse_size


def test_parse_size():
    assert parse_size("64MiB") == 64 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("700M") == 700_000_000 and parse_size("4096") == 4096
    with pytest.raises(Exception):
        parse_size("lots")


def test_demo_runs_and_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "mmapload", "demo", "--size", "8MiB",
                          "--ring-bytes", "1MiB"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "quantized to FP8" in out.stdout and "host RSS" in out.stdout and "generated" in out.stdout


def test_quantize_reports_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    assert main(["quantize", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "Traceback" not in err


def test_convert_command_writes_a_loadable_fp8_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from mmapload.synth import make_llama_checkpoint
    src = make_llama_checkpoint(tmp_path / "src", 2 << 20, shards=2)
    dst = tmp_path / "fp8"
    assert main(["convert", str(src), str(dst), "--granularity", "channel", "--ring-bytes", "1MiB"]) == 0
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
    q = tensors["model.layers.0.mlp.up_proj.weight"]
    assert q.dtype.itemsize == 1 and tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (q.shape[0], 1)
    assert (dst / "config.json").exists() and (dst / "model.safetensors.index.json").exists()


def test_convert_command_takes_block_size_scale_dtype_and_keep_page_cache(tmp_path, capsys):
    from safetensors.torch import load_file

    from mmapload.synth import make_llama_checkpoint
    src = make_llama_checkpoint(tmp_path / "src", 1 << 20, shards=1)
    dst = tmp_path / "fp8"
    assert main(["convert", str(src), str(dst), "--granularity", "block", "--block-size", "32x64",
                 "--scale-dtype", "weight", "--keep-page-cache", "--policy", "names"]) == 0
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
    q, s = tensors["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight_scale"]
    assert s.dtype == torch.bfloat16 and s.shape == (-(-q.shape[0] // 32), -(-q.shape[1] // 64))
    for bad in ("0x64", "32", "axb", "-1,4"):
        with pytest.raises(SystemExit):
            main(["convert", str(src), str(tmp_path / "x"), f"--block-size={bad}"])
        assert "not a block size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(src), str(tmp_path / "x"), "--scale-dtype", "bf16"])
    assert not (tmp_path / "x").exists()


def test_demo_keep_refuses_a_folder_with_files_and_a_disk_without_room(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 4096}')
    assert main(["demo", "--size", "1MiB", "--keep", str(model)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in model.iterdir()] == ["config.json"]
    assert (model / "config.json").read_text() == '{"hidden_size": 4096}'
    assert main(["demo", "--size", "1000000TiB", "--keep", str(tmp_path / "new")]) == 2
    assert "bytes free" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_tp_only_options_without_tp_are_refused(tmp_path, capsys):
    for extra in (["--tp-timeout", "5"], ["--tp-plan", '{"a": "row"}']):
        with pytest.raises(SystemExit):
            main(["quantize", str(tmp_path / "x.safetensors"), *extra])
        assert "add --tp" in capsys.readouterr().err


def test_convert_offers_only_the_fp8_format_the_checkpoints_store(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--fp8", "e5m2"])
    assert "invalid choice: 'e5m2'" in capsys.readouterr().err


def test_an_error_naming_library_keywords_also_names_the_options(tmp_path, capsys):
    from safetensors.torch import save_file
    bad = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.full((4, 4), float("nan"))}, bad)
    assert main(["quantize", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "skip=['a.weight']" in err and err.rstrip().endswith("(on the command line: --skip)"), err
