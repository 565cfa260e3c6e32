"""The data store (store.py): tokenized once, read by index, the same examples as tokenizing in
memory (data.store=off, the code every run used before), rebuilt when its key changes, never used
half-built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stillroom.config import Config
from stillroom.recipes import load_config
from stillroom.data import store, store_build
from stillroom.data import examples as data
from stillroom.errors import UserError

from conftest import CORPUS, run_cli

HERE = Path(__file__).resolve().parents[1]   # tests/: the workers live there


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))


def cfg_for(path, *extra):
    return load_config(None, [f"data.path={path}", "data.seq_len=96", *extra], Config)


def as_tuples(examples):
    return [(list(e.input_ids), list(e.labels), e.segments, e.route) for e in examples]


def both(path, *extra, tok):
    """(examples through the store, examples tokenized in memory) for the same config."""
    cfg = cfg_for(path, *extra)
    got = store.load_data(cfg, tok)
    want = store.load_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"store": "off"})}), tok)
    return got, want


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sources(tmp_path):
    """One file of every kind the store reads: chat, pairs with long answers (cut at seq_len),
    Alpaca, text rows (packed across rows), a plain text file, and rows mixing kinds."""
    chat = write_rows(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Tell me {i}."},
                      {"role": "assistant", "content": CORPUS[i % 6]}]} for i in range(30)])
    pairs = write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": f"Q{i}: " + CORPUS[i % 6], "response": " ".join(CORPUS[:1 + i % 5]),
         **({"truncated": True} if i % 7 == 0 else {})} for i in range(30)])
    alpaca = write_rows(tmp_path / "alpaca.jsonl", [
        {"instruction": "Repeat.", "input": CORPUS[i % 6], "output": CORPUS[(i + 1) % 6]} for i in range(20)])
    text_rows = write_rows(tmp_path / "text.jsonl", [{"text": " ".join(CORPUS[:1 + i % 9])} for i in range(25)])
    mixed = write_rows(tmp_path / "mixed.jsonl", [
        {"text": CORPUS[i % 6] * (1 + i % 4)} if i % 2 else
        {"prompt": CORPUS[i % 6], "response": CORPUS[(i + 2) % 6]} for i in range(30)])
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join(CORPUS[:40]))
    return {"chat": chat, "pairs": pairs, "alpaca": alpaca, "text_rows": text_rows, "mixed": mixed, "plain": plain}


@pytest.mark.parametrize("pack", [False, True])
def test_the_store_gives_the_examples_of_tokenizing_in_memory(sources, tok, pack):
    for name, path in sources.items():
        got, want = both(path, f"data.pack={pack}", tok=tok)
        assert isinstance(got[0], store.Examples)
        assert as_tuples(got[0]) == as_tuples(want[0]), name
        assert as_tuples(got[1]) == as_tuples(want[1]), name
        assert len(got[0]) > 1 and len(got[1]) >= 1, name
    # a held-out file, max_examples, no held-out split
    got, want = both(sources["mixed"], "data.pack=true", f"data.eval_path={sources['chat']}", "data.max_examples=17",
                     tok=tok)
    assert as_tuples(got[0]) == as_tuples(want[0]) and as_tuples(got[1]) == as_tuples(want[1])
    got, want = both(sources["pairs"], "data.eval_fraction=0", tok=tok)
    assert as_tuples(got[0]) == as_tuples(want[0]) and len(got[1]) == 0


def test_packed_rows_keep_every_document_boundary(tmp_path, tok):
    """A packed block of short text rows joined with other examples keeps its own documents apart
    (it used to become one segment, letting its documents attend to each other)."""
    path = write_rows(tmp_path / "short.jsonl", [{"text": "the cat"}, {"text": "a mat"}, {"text": "the sea"},
                                                 {"prompt": "cat", "response": "the moon"}])
    train, _ = store.load_data(cfg_for(path, "data.pack=true", "data.eval_fraction=0", "data.store=off"), tok)
    assert len(train) == 1 and len(train[0].segments) == 4
    got, want = both(path, "data.pack=true", "data.eval_fraction=0", tok=tok)
    assert as_tuples(got[0]) == as_tuples(want[0])
    for e in train:
        assert sum(e.segments or (len(e.input_ids),)) == len(e.input_ids)
        at = 0
        for n in (e.segments if e.segments else ()):
            assert e.labels[at] == -100   # no document's first token is a target
            at += n


def test_routed_rows_keep_their_teacher(tmp_path, tok, teacher_dir):
    path = write_rows(tmp_path / "routed.jsonl", [
        {"prompt": CORPUS[i % 6], "response": CORPUS[(i + 1) % 6], "src": "b" if i % 3 else "a"} if i % 2 else
        {"text": CORPUS[i % 6], "src": "a"} for i in range(24)])
    extra = ["teacher.route_field=src", "teacher.name=a", f"teacher.model={teacher_dir}",
             f"teacher.mix=[{{name: b, model: {teacher_dir}}}]"]
    got, want = both(path, *extra, tok=tok)
    assert as_tuples(got[0]) == as_tuples(want[0]) and as_tuples(got[1]) == as_tuples(want[1])
    assert {e.route for e in got[0]} == {"a", "b"}


def test_a_second_run_reads_no_text_and_gets_the_same_examples(sources, tok, monkeypatch):
    cfg = cfg_for(sources["mixed"], "data.pack=true")
    first = store.load_data(cfg, tok)

    def no(*a, **k):
        raise AssertionError("the data was read again")
    for name in ("_tokenize_shard", "_rows_of_jsonl", "text_ids", "build"):
        monkeypatch.setattr(store_build, name, no)
    monkeypatch.setattr(store, "build", no)
    for name in ("_read", "text_ids", "tokenize_rows"):
        monkeypatch.setattr(data, name, no)
    again = store.load_data(cfg, tok)
    assert as_tuples(again[0]) == as_tuples(first[0]) and as_tuples(again[1]) == as_tuples(first[1])


def test_a_changed_key_builds_a_new_store(sources, tok, tmp_path):
    path = sources["pairs"]
    base = tmp_path / "cache" / "data"
    stores = lambda: sorted(p.name for p in base.glob("store-*"))  # noqa: E731
    store.load_data(cfg_for(path), tok)
    assert len(stores()) == 1
    store.load_data(cfg_for(path), tok)
    assert len(stores()) == 1                                  # same key: reused
    store.load_data(cfg_for(path, "data.seq_len=80"), tok)      # seq_len
    assert len(stores()) == 2
    from conftest import make_tokenizer
    other = make_tokenizer(vocab_size=300)                       # another tokenizer
    store.load_data(cfg_for(path), other)
    assert len(stores()) == 3
    rows = path.read_text().splitlines()                        # the file changed
    path.write_text("\n".join(rows[:-3]) + "\n")
    train, held = store.load_data(cfg_for(path), tok)
    assert len(stores()) == 4 and len(train) + len(held) == 27
    store.load_data(cfg_for(path, "train.seed=5"), tok)         # another held-out split
    assert len(stores()) == 5
    store.load_data(cfg_for(path, "train.lr=1e-3", "data.workers=1"), tok)   # nothing the data depends on
    assert len(stores()) == 5


def test_a_killed_build_is_never_used(sources, tmp_path):
    """SIGKILL after every array is written, just before the store is renamed into place: no store
    is there, only the build's leftover, which the next build removes (and builds in full)."""
    path = sources["chat"]
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from conftest import make_tokenizer\n"
            "from stillroom.data import store\n"
            "from stillroom.config import Config\nfrom stillroom.recipes import load_config\n"
            "cfg = load_config(None, ['data.path=%s', 'data.seq_len=48'], Config)\n"
            "train, held = store.load_data(cfg, make_tokenizer())\n"
            "print(len(train), len(held))\n") % (str(HERE), path)
    env = dict(os.environ, STILLROOM_FAULT="store.written")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    base = tmp_path / "cache" / "data"
    done = lambda: [p for p in base.glob("store-*") if ".tmp-" not in p.name]  # noqa: E731
    assert not done() and list(base.glob("store-*.tmp-*"))
    env.pop("STILLROOM_FAULT")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["27", "3"]
    assert not list(base.glob("store-*.tmp-*")) and len(done()) == 1


def test_several_processes_build_the_same_store_and_count_lines_across_shards(tmp_path, tok, monkeypatch):
    """data.workers=3 cuts the file into byte ranges tokenized by 3 processes: the same store as one
    process, and a bad row is reported by its line in the whole file."""
    rows = [json.dumps({"prompt": CORPUS[i % 6] + str(i), "response": CORPUS[(i + 1) % 6]}) for i in range(200)]
    rows[150] = "{not json"
    rows[170] = ""
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows) + "\n")
    one = store.load_data(cfg_for(path, "data.skip_bad_rows=true", "data.store=" + str(tmp_path / "one")), tok)
    calls = []
    real = store_build._run_parallel
    monkeypatch.setattr(store_build, "_run_parallel", lambda jobs, *a: calls.append(len(jobs)) or real(jobs, *a))
    many = store.load_data(cfg_for(path, "data.skip_bad_rows=true", "data.workers=3",
                                  "data.store=" + str(tmp_path / "many")), tok)
    assert calls and calls[0] > 1
    assert as_tuples(one[0]) == as_tuples(many[0]) and as_tuples(one[1]) == as_tuples(many[1])
    monkeypatch.setattr(store_build, "SHARD_BYTES", 2500)   # one process, the file read a few kB at a time
    pieces = store.load_data(cfg_for(path, "data.skip_bad_rows=true", "data.workers=1",
                                    "data.store=" + str(tmp_path / "pieces")), tok)
    assert as_tuples(one[0]) == as_tuples(pieces[0]) and as_tuples(one[1]) == as_tuples(pieces[1])
    report = json.loads(next((tmp_path / "pieces").glob("store-*/index.json")).read_text())["reports"][0]
    assert report["bad"] == [[151, "invalid JSON: Expecting property name enclosed in double quotes"]]
    report = json.loads(next((tmp_path / "many").glob("store-*/index.json")).read_text())["reports"][0]
    assert report["bad"] == [[151, "invalid JSON: Expecting property name enclosed in double quotes"]]
    with pytest.raises(UserError, match=r"1 of 199 rows in .* are bad: row 151 \(invalid JSON"):
        store.load_data(cfg_for(path, "data.workers=2", "data.store=" + str(tmp_path / "strict")), tok)
    assert not list((tmp_path / "strict").glob("store-*"))   # a refused build leaves nothing


def test_examples_read_by_index_behave_as_a_list(sources, tok):
    train, held = store.load_data(cfg_for(sources["chat"]), tok)
    listed = list(train)
    assert len(train) == len(listed) and as_tuples(train[2:9]) == as_tuples(listed[2:9])
    assert as_tuples(train[1::2]) == as_tuples(listed[1::2])
    assert as_tuples(train + held) == as_tuples(listed + list(held))
    assert as_tuples([train[-1]]) == as_tuples(listed[-1:])
    assert as_tuples(data.micro_batch(train, 7, 4, 0)) == as_tuples(data.micro_batch(listed, 7, 4, 0))


def test_prepare_builds_the_store_a_run_then_reads(tmp_path, teacher_dir, chat_file):
    env = {"STILLROOM_CACHE": str(tmp_path / "cache")}
    over = [f"teacher.model={teacher_dir}", f"data.path={chat_file}", "data.seq_len=64"]
    r = run_cli("prepare", *over, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "36 training / 4 held-out examples" in r.stdout
    folder = next((tmp_path / "cache" / "data").glob("store-*"))
    stamp = (folder / "tokens.npy").stat().st_mtime_ns
    r = run_cli("prepare", *over, env=env)
    assert r.returncode == 0 and str(folder) in r.stdout
    assert (folder / "tokens.npy").stat().st_mtime_ns == stamp
    r = run_cli("prepare", *over[:2], "data.store=off", env=env)
    assert r.returncode == 2 and "nothing to prepare" in r.stderr
    r = run_cli("prepare", f"teacher.model={teacher_dir}", f"data.path={tmp_path / 'missing.jsonl'}", env=env)
    assert r.returncode == 2 and "data file not found" in r.stderr and "Traceback" not in r.stderr


def test_a_dataset_folder_is_read_through_the_store(tmp_path, tok):
    import datasets
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": f"Q{i} " + CORPUS[i % 6], "response": CORPUS[(i + 1) % 6]}
                                for i in range(30)]).save_to_disk(str(folder))
    got, want = both(folder, "data.workers=2", tok=tok)   # two processes over index ranges
    assert as_tuples(got[0]) == as_tuples(want[0]) and as_tuples(got[1]) == as_tuples(want[1])


def test_a_store_folder_that_cannot_be_written_is_one_line(tmp_path, teacher_dir, chat_file):
    from conftest import assert_user_error
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    from conftest import tiny_overrides
    r = run_cli("distill", *tiny_overrides(teacher_dir, chat_file, tmp_path / "out"), f"data.store={blocker}",
                "--no-progress", env={"STILLROOM_CACHE": str(tmp_path / "c")})
    assert_user_error(r, r"data store folder .*file: cannot create it")
    assert blocker.read_text() == "not a folder" and not (tmp_path / "out").exists()


def test_a_second_run_waits_for_the_build_of_the_same_store(sources, tok, tmp_path):
    """Two runs needing one store: the second waits on the first's lock, then reads its store."""
    import threading
    import time

    from stillroom.run import folders
    cfg = cfg_for(sources["chat"])
    key, _ = store.store_key(cfg.data, tok, cfg.train.seed)
    base = tmp_path / "cache" / "data"
    got = {}
    with folders.claim(base, key="the data store", name=f"store-{key}"):   # a first run, building
        t = threading.Thread(target=lambda: got.update(ex=store.load_data(cfg, tok)))
        t.start()
        time.sleep(1.5)
        assert t.is_alive() and not got and not list(base.glob("store-*"))
    t.join(60)
    assert got and len(list(base.glob("store-*"))) == 1


def test_another_process_of_a_launch_waits_for_the_build_too(sources, tok, tmp_path, monkeypatch):
    """In a launch where every process asks to build (a library caller), the lock is taken by every
    process: process 1 waits for the build in progress instead of removing it as a leftover (it
    did: the lock was the main process's only, and the two builds broke each other)."""
    import threading
    import time

    from stillroom.run import folders
    cfg = cfg_for(sources["chat"])
    key, _ = store.store_key(cfg.data, tok, cfg.train.seed)
    base = tmp_path / "cache" / "data"
    building = base / f"store-{key}.tmp-999999"   # the main process's build, in progress
    got = {}
    with folders.claim(base, key="the data store", name=f"store-{key}"):
        building.mkdir(parents=True)
        monkeypatch.setenv("RANK", "1")
        t = threading.Thread(target=lambda: got.update(ex=store.load_data(cfg, tok)))
        t.start()
        time.sleep(1.5)
        assert t.is_alive() and building.is_dir()   # waiting; the build in progress untouched
    t.join(60)
    assert got and len([p for p in base.glob("store-*") if ".tmp-" not in p.name]) == 1


def test_a_hub_dataset_is_streamed_into_the_store(tmp_path, tok, monkeypatch):
    """A hub id (not a local path) is read with load_dataset(..., streaming=True), as it downloads:
    here the hub is stood in for by local rows, streamed the same way."""
    import datasets
    rows = [{"prompt": f"Q{i} " + CORPUS[i % 6], "response": CORPUS[(i + 1) % 6]} for i in range(30)]
    calls = []

    def load_dataset(path, split=None, streaming=False, **kw):
        calls.append((path, split, streaming))
        ds = datasets.Dataset.from_list(rows)
        return ds.to_iterable_dataset() if streaming else ds
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got, want = both("someone/instructions", "data.format=hf", tok=tok)
    assert ("someone/instructions", "train", True) in calls
    assert as_tuples(got[0]) == as_tuples(want[0]) and as_tuples(got[1]) == as_tuples(want[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state   # a zombie waiting for its reaper is gone


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker processes from /proc (Linux)")
def test_a_killed_build_leaves_no_worker_holding_its_lock(tmp_path):
    """kill -9 of a store build with worker processes: the workers die with it (they held the
    build's lock through the fd they inherited, and every later command on that data waited on
    it for ever), and the next build takes the lock and finishes."""
    import signal
    import time
    rows = [json.dumps({"prompt": CORPUS[i % 6] + str(i), "response": CORPUS[(i + 1) % 6]}) for i in range(300)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows) + "\n")
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from conftest import make_tokenizer\n"
            "from stillroom.data import store, store_build\n"
            "from stillroom.config import Config\nfrom stillroom.recipes import load_config\n"
            "store_build.SHARD_BYTES = 2500\n"
            "real = store_build._tokenize_shard\n"
            "def slow(job):\n"
            "    time.sleep(float(sys.argv[1]))\n"
            "    return real(job)\n"
            "store_build._tokenize_shard = slow\n"
            "cfg = load_config(None, ['data.path=%s', 'data.seq_len=48', 'data.workers=2'], Config)\n"
            "train, held = store.load_data(cfg, make_tokenizer())\n"
            "print(len(train), len(held))\n") % (str(HERE), path)
    build = subprocess.Popen([sys.executable, "-c", code, "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers, until = [], time.time() + 60
    while len(workers) < 2 and time.time() < until:
        time.sleep(0.2)
        found = subprocess.run(["pgrep", "-P", str(build.pid)], capture_output=True, text=True).stdout.split()
        workers = [int(p) for p in found]
    assert len(workers) == 2, build.stderr.read().decode()[-2000:] if build.poll() is not None else workers
    build.send_signal(signal.SIGKILL)
    build.wait()
    until = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < until:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "a worker outlived its killed parent"
    r = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
