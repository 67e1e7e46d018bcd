//! `examples/eval.rs` on bad input: each case runs the built binary and expects
//! exit status 2, one `error: ...` line on stderr, nothing on stdout, no panic,
//! and no `--out` file left behind. Good runs (synthetic and real data) exit 0.
//!
//! Uses the binary that `cargo test` builds into `target/<profile>/examples/`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Synthetic inputs: `q` is `[T, HQ, D]`, `k` and `v` are `[T, HKV, D]`.
const T: u64 = 4;
const HQ: u64 = 2;
const HKV: u64 = 1;
const D: u64 = 8;

/// The eval example next to this test's binary (`target/<profile>/deps/..`).
fn eval_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir
        .join("examples")
        .join(format!("eval{}", std::env::consts::EXE_SUFFIX));
    let hint = "run plain `cargo test`, or `cargo build --example eval` first";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {hint}", bin.display()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/eval.rs");
    let edited = std::fs::metadata(&src).and_then(|m| m.modified()).unwrap();
    assert!(
        built >= edited,
        "{} is older than {}; {hint}",
        bin.display(),
        src.display()
    );
    bin
}

/// A `.npy` v1.0 file: header dict padded to 64 bytes, then `data` as is.
fn npy(descr: &str, fortran: bool, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let comma = if shape.len() == 1 { "," } else { "" };
    let mut dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': ({}{comma}), }}",
        if fortran { "True" } else { "False" },
        dims.join(", ")
    );
    let len = (10 + dict.len() + 1).next_multiple_of(64) - 10;
    dict.push_str(&" ".repeat(len - dict.len() - 1));
    dict.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((len as u16).to_le_bytes());
    b.extend(dict.as_bytes());
    b.extend(data);
    b
}

/// `n` deterministic little-endian f32 values in [-0.5, 0.5).
fn f32_data(n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5).to_le_bytes())
        .collect()
}

/// A good `.npy` of `shape`.
fn f32_npy(shape: &[u64]) -> Vec<u8> {
    npy("<f4", false, shape, &f32_data(shape.iter().product()))
}

/// Like [`f32_npy`] with one element replaced by `x`.
fn f32_npy_with(shape: &[u64], index: usize, x: f32) -> Vec<u8> {
    let mut b = f32_npy(shape);
    let at = b.len() - 4 * shape.iter().product::<u64>() as usize + 4 * index;
    b[at..at + 4].copy_from_slice(&x.to_le_bytes());
    b
}

/// A temp directory for one test, removed on drop.
struct Case {
    dir: PathBuf,
}

impl Case {
    fn new(name: &str) -> Case {
        let dir = std::env::temp_dir().join(format!("kvq-eval-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Case { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Arguments of a good decode run on synthetic files; a flag repeated
    /// after these overrides it (eval keeps the last value).
    fn good_args(&self) -> Vec<OsString> {
        let q = self.file("q.npy", &f32_npy(&[T, HQ, D]));
        let k = self.file("k.npy", &f32_npy(&[T, HKV, D]));
        let v = self.file("v.npy", &f32_npy(&[T, HKV, D]));
        let mut a = Vec::<OsString>::new();
        for (flag, p) in [("--q", q), ("--k", k), ("--v", v)] {
            a.push(flag.into());
            a.push(p.into());
        }
        a.extend(args(&[
            "--k-dtype",
            "int8",
            "--v-dtype",
            "int8",
            "--mode",
            "decode",
            "--backend",
            "cpu",
        ]));
        a
    }

    /// Good args with `--flag` set to a file of `bytes`.
    fn with_file(&self, flag: &str, bytes: &[u8]) -> Vec<OsString> {
        let mut a = self.good_args();
        let p = self.file(&format!("bad{flag}.npy"), bytes);
        a.extend([flag.into(), p.into()]);
        a
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn args(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

fn run(a: &[OsString], env: &[(&str, &str)]) -> Output {
    Command::new(eval_bin())
        .args(a)
        .envs(env.iter().copied())
        .output()
        .expect("spawn eval")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs eval, expects a bad-input failure whose message contains `needle`, and
/// returns the message.
fn bad(a: &[OsString], needle: &str) -> String {
    bad_env(a, &[], needle)
}

fn bad_env(a: &[OsString], env: &[(&str, &str)], needle: &str) -> String {
    let o = run(a, env);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    let ctx = format!("args {a:?}\nstdout: {out}\nstderr: {err}");
    assert_eq!(o.status.code(), Some(2), "exit status; {ctx}");
    assert!(!err.contains("panicked"), "panic; {ctx}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line; {ctx}");
    assert!(err.ends_with('\n'), "{ctx}");
    let line = lines[0];
    assert!(
        line.len() > "error: ".len() && line.starts_with("error: "),
        "{ctx}"
    );
    assert!(line.contains(needle), "expected {needle:?}; {ctx}");
    assert!(out.is_empty(), "stdout; {ctx}");
    eprintln!("{line}");
    line.to_string()
}

/// Runs eval, expects success and returns stdout's one line.
fn good(a: &[OsString]) -> String {
    let o = run(a, &[]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    let ctx = format!("args {a:?}\nstdout: {out}\nstderr: {err}");
    assert_eq!(o.status.code(), Some(0), "{ctx}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{ctx}");
    assert_eq!(out.lines().count(), 1, "{ctx}");
    assert!(out.starts_with("nmse="), "{ctx}");
    out.trim_end().to_string()
}

fn stat(line: &str, key: &str) -> f64 {
    let v = line
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key} in {line:?}"));
    v.parse().unwrap()
}

#[test]
fn good_synthetic_decode_and_prefill() {
    let c = Case::new("good-synth");
    for (mode, rows) in [("decode", 1), ("prefill", T)] {
        let out = c.path(&format!("{mode}.npy"));
        let mut a = c.good_args();
        a.extend(args(&["--mode", mode, "--out"]));
        a.push(out.clone().into());
        let line = good(&a);
        assert!(stat(&line, "nmse") < 1e-3, "{line}");
        let len = std::fs::metadata(&out).unwrap().len();
        assert_eq!(len, 128 + 4 * rows * HQ * D, "{mode}");
    }
}

#[test]
fn good_real_layer0_decode() {
    let c = Case::new("good-real");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_135m_L0");
    let out = c.path("o.npy");
    let mut a = Vec::<OsString>::new();
    for x in ["q", "k", "v"] {
        a.push(format!("--{x}").into());
        a.push(format!("{}_{x}.npy", data.display()).into());
    }
    a.extend(args(&[
        "--k-dtype",
        "int8",
        "--v-dtype",
        "int8",
        "--mode",
        "decode",
        "--backend",
        "cpu",
        "--out",
    ]));
    a.push(out.clone().into());
    let line = good(&a);
    assert!(
        stat(&line, "nmse") < 1e-3 && stat(&line, "min_cos") > 0.99,
        "{line}"
    );
    let bytes = std::fs::read(&out).unwrap();
    let o = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(o.shape(), &[1, 9, 64]);
}

#[test]
fn missing_file() {
    let c = Case::new("missing");
    let mut a = c.good_args();
    a.extend([OsString::from("--k"), c.path("nope.npy").into()]);
    bad(&a, "--k ");
}

#[test]
fn not_npy() {
    let c = Case::new("not-npy");
    bad(&c.with_file("--q", b"q,k,v\n1,2,3\n"), "not a .npy file");
    bad(&c.with_file("--v", b""), "not a .npy file");
    // Valid magic, garbage header.
    bad(
        &c.with_file("--k", b"\x93NUMPY\x01\x00\x04\x00xyz\n"),
        "not a .npy file",
    );
}

#[test]
fn wrong_dtype() {
    let c = Case::new("dtype");
    let f64s: Vec<u8> = (0..T * HQ * D)
        .flat_map(|_| 0.25f64.to_le_bytes())
        .collect();
    bad(
        &c.with_file("--q", &npy("<f8", false, &[T, HQ, D], &f64s)),
        "<f8",
    );
    let be: Vec<u8> = (0..T * HKV * D)
        .flat_map(|_| 0.25f32.to_be_bytes())
        .collect();
    bad(
        &c.with_file("--k", &npy(">f4", false, &[T, HKV, D], &be)),
        ">f4",
    );
    let ints = vec![0u8; (4 * T * HKV * D) as usize];
    bad(
        &c.with_file("--v", &npy("<i4", false, &[T, HKV, D], &ints)),
        "<i4",
    );
}

#[test]
fn wrong_rank() {
    let c = Case::new("rank");
    bad(
        &c.with_file("--q", &f32_npy(&[T, HQ * D])),
        "expected [T, H, D]",
    );
    bad(
        &c.with_file("--k", &f32_npy(&[1, T, HKV, D])),
        "expected [T, H, D]",
    );
    bad(
        &c.with_file("--v", &f32_npy(&[T * HKV * D])),
        "expected [T, H, D]",
    );
}

#[test]
fn fortran_order() {
    let c = Case::new("order");
    let data = f32_data(T * HKV * D);
    bad(
        &c.with_file("--k", &npy("<f4", true, &[T, HKV, D], &data)),
        "Fortran",
    );
}

#[test]
fn empty_or_short_data() {
    let c = Case::new("short");
    bad(&c.with_file("--q", &f32_npy(&[0, HQ, D])), "empty shape");
    let full = f32_npy(&[T, HKV, D]);
    bad(&c.with_file("--v", &full[..full.len() - 4]), "--v ");
    // A shape whose element count overflows u64.
    let huge = npy("<f4", false, &[1 << 40, 1 << 40, 1 << 40], &f32_data(8));
    bad(&c.with_file("--k", &huge), "--k ");
}

#[test]
fn shape_mismatch() {
    let c = Case::new("mismatch");
    bad(&c.with_file("--q", &f32_npy(&[T - 1, HQ, D])), "tokens");
    bad(&c.with_file("--q", &f32_npy(&[T, HQ, 2 * D])), "head_dim");
    let mut a = c.with_file("--q", &f32_npy(&[T, 3, D]));
    for flag in ["--k", "--v"] {
        let p = c.file(&format!("h2{flag}.npy"), &f32_npy(&[T, 2, D]));
        a.extend([flag.into(), p.into()]);
    }
    bad(&a, "not a multiple of kv heads");
    bad(&c.with_file("--v", &f32_npy(&[T, 2, D])), "differ in shape");
}

#[test]
fn non_finite() {
    let c = Case::new("nan");
    let line = bad(
        &c.with_file("--v", &f32_npy_with(&[T, HKV, D], 13, f32::NAN)),
        "NaN",
    );
    assert!(line.contains("[1, 0, 5]"), "{line}");
    bad(
        &c.with_file("--q", &f32_npy_with(&[T, HQ, D], 0, f32::INFINITY)),
        "inf",
    );
}

#[test]
fn unknown_dtype_mode_backend() {
    let c = Case::new("unknown");
    let mut a = c.good_args();
    a.extend(args(&["--k-dtype", "int3"]));
    bad(&a, "--k-dtype");
    let mut a = c.good_args();
    a.extend(args(&["--v-dtype", "int4:g12"]));
    bad(&a, "--v-dtype");
    let mut a = c.good_args();
    a.extend(args(&["--mode", "train"]));
    bad(&a, "--mode");
    let mut a = c.good_args();
    a.extend(args(&["--backend", "tpu"]));
    bad(&a, "--backend");
}

#[test]
fn bad_command_line() {
    let c = Case::new("cmdline");
    let mut a = c.good_args();
    a.extend(args(&["--frobnicate", "1"]));
    bad(&a, "unexpected argument '--frobnicate'");
    let mut a = c.good_args();
    a.push("--out".into());
    bad(&a, "a value is required for '--out");
    bad(&c.good_args()[2..], "not provided: --q <Q>");
    bad(&[], "required arguments were not provided");
}

/// `--help` goes to stdout with status 0 and lists every dtype name.
#[test]
fn help() {
    let o = run(&args(&["--help"]), &[]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(err.is_empty(), "{err}");
    for s in [
        "--k-dtype",
        "--v-dtype",
        "--mode",
        "--rotate",
        "--out",
        "bf16",
        "fp8-e5m2",
        "int4:gN",
    ] {
        assert!(out.contains(s), "{s} in {out}");
    }
}

#[cfg(unix)]
#[test]
fn non_utf8_argument() {
    use std::os::unix::ffi::OsStringExt;
    let c = Case::new("utf8");
    let mut a = c.good_args();
    a.extend(["--q".into(), OsString::from_vec(b"q\xff.npy".to_vec())]);
    bad(&a, "UTF-8");
}

#[test]
fn unwritable_out() {
    let c = Case::new("out-unwritable");
    let mut a = c.good_args();
    let out = c.path("no-such-dir").join("o.npy");
    a.extend([OsString::from("--out"), out.clone().into()]);
    bad(&a, "--out");
    assert!(!out.exists());
    let mut a = c.good_args();
    a.extend([OsString::from("--out"), c.dir.clone().into()]);
    bad(&a, "--out");
    assert!(c.dir.is_dir());
}

/// Errors found only after `--out` was created remove it again.
#[test]
fn error_after_out_created() {
    let c = Case::new("out-late");
    let out = c.path("o.npy");
    let with_out = |mut a: Vec<OsString>| {
        a.extend([OsString::from("--out"), out.clone().into()]);
        a
    };
    // Finite but beyond f16: rejected by the cache on append.
    let a = with_out(c.with_file("--k", &f32_npy_with(&[T, HKV, D], 3, 1e6)));
    bad(&a, "1000000");
    assert!(!out.exists(), "{} left behind", out.display());
    // head_dim 12 is no multiple of 8: rejected when the cache is made.
    let mut a = with_out(c.good_args());
    for (flag, h) in [("--q", HQ), ("--k", HKV), ("--v", HKV)] {
        let p = c.file(&format!("d12{flag}.npy"), &f32_npy(&[T, h, 12]));
        a.extend([flag.into(), p.into()]);
    }
    bad(&a, "head_dim 12");
    assert!(!out.exists(), "{} left behind", out.display());
    // Rotation needs a power-of-two head_dim.
    let mut a = with_out(c.good_args());
    for (flag, h) in [("--q", HQ), ("--k", HKV), ("--v", HKV)] {
        let p = c.file(&format!("d24{flag}.npy"), &f32_npy(&[T, h, 24]));
        a.extend([flag.into(), p.into()]);
    }
    a.push("--rotate".into());
    bad(&a, "power-of-two");
    assert!(!out.exists(), "{} left behind", out.display());
    // A bad KVQ_BACKEND is read only without --backend, after --out exists.
    let mut a = with_out(c.good_args());
    a.retain(|x| x != "--backend" && x != "cpu");
    bad_env(&a, &[("KVQ_BACKEND", "tpu")], "tpu");
    assert!(!out.exists(), "{} left behind", out.display());
    // An error before creation leaves no file either.
    let a = with_out(c.with_file("--q", &f32_npy_with(&[T, HQ, D], 1, f32::NAN)));
    bad(&a, "NaN");
    assert!(!out.exists(), "{} left behind", out.display());
}
