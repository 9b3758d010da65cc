"""The shared on-disk caches of compiled kernels (utils/compile_cache.py)."""
from utils.compile_cache import COMPILE_CACHE, use_compile_cache


def test_project_folder_unless_the_user_chose_one(tmp_path):
    environ = {"TRITON_CACHE_DIR": str(tmp_path / "mine")}
    cache = use_compile_cache(tmp_path / "compiled", environ)
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "inductor")
    assert environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
    assert cache.chosen_by_user == ("TRITON_CACHE_DIR",) and not cache.had_entries
    assert "empty" in cache.describe() and "(yours)" in cache.describe()


def test_a_later_process_is_told_it_reuses(tmp_path):
    use_compile_cache(tmp_path, {})
    (tmp_path / "inductor" / "fxgraph").mkdir(parents=True)
    (tmp_path / "inductor" / "fxgraph" / "entry").write_bytes(b"x")
    cache = use_compile_cache(tmp_path, {})
    assert cache.had_entries and "reused" in cache.describe()


def test_default_folder_is_the_projects_ignored_cache():
    assert COMPILE_CACHE.parent.name == "cache" and COMPILE_CACHE.name == "compiled"


def test_a_second_run_in_one_process_does_not_take_the_first_runs_folders_for_the_users(tmp_path):
    """The report runs each setting's sweep in one process: the variables the first run set are the
    project's folders, not the user's choice."""
    environ = {"TRITON_CACHE_DIR": str(tmp_path / "mine")}
    use_compile_cache(tmp_path / "compiled", environ)
    again = use_compile_cache(tmp_path / "compiled", environ)
    assert again.chosen_by_user == ("TRITON_CACHE_DIR",) and again.describe().count("(yours)") == 1
