//! Where `qemu-launch --vm` finds the registry: the flags and environment variables `vnpctl`
//! reads (`VNP_REGISTRY`, `VNP_TLS_DIR`, `VNP_CA`, `VNP_CERT`, `VNP_KEY`), so one set of
//! exports serves both. The names qemu-launch read before (`VNP_REGISTRY_URL`,
//! `VNP_REGISTRY_CA`, `VNP_REGISTRY_CERT`, `VNP_REGISTRY_KEY`) still work, with a deprecation
//! warning, when the current name is not set. Pure: the environment comes in as a lookup.

use std::path::PathBuf;

/// Deprecated variable and the one that replaces it.
pub const DEPRECATED: [(&str, &str); 4] = [
    ("VNP_REGISTRY_URL", "VNP_REGISTRY"),
    ("VNP_REGISTRY_CA", "VNP_CA"),
    ("VNP_REGISTRY_CERT", "VNP_CERT"),
    ("VNP_REGISTRY_KEY", "VNP_KEY"),
];

/// What the command line (and clap's reading of the current variables) gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryArgs {
    pub url: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A complete registry connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySettings {
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RegistryArgs {
    /// Fills unset values from the deprecated variables; returns one warning per variable used.
    pub fn with_deprecated(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let mut take = |old: &str, new: &str| {
            let value = lookup(old).filter(|v| !v.is_empty())?;
            warnings.push(format!("{old} is deprecated; use {new} (as vnpctl does)"));
            Some(value)
        };
        let [url, ca, cert, key] = DEPRECATED;
        if self.url.is_none() {
            self.url = take(url.0, url.1);
        }
        for (slot, (old, new)) in [
            (&mut self.ca, ca),
            (&mut self.cert, cert),
            (&mut self.key, key),
        ] {
            if slot.is_none() {
                *slot = take(old, new).map(PathBuf::from);
            }
        }
        (self, warnings)
    }

    /// The connection, with vnpctl's rule: explicit files win, else `ca.pem`, `admin.pem`
    /// and `admin.key` in the TLS directory.
    pub fn settings(&self) -> Result<RegistrySettings, String> {
        let url = self
            .url
            .clone()
            .ok_or("no registry: give --registry or VNP_REGISTRY")?;
        let need = |explicit: &Option<PathBuf>, file: &str, flag: &str| {
            explicit
                .clone()
                .or_else(|| self.tls_dir.as_ref().map(|d| d.join(file)))
                .ok_or_else(|| {
                    format!(
                        "no {flag}: give --{flag} (VNP_{}) or --tls-dir (VNP_TLS_DIR)",
                        flag.trim_start_matches("registry-").to_uppercase()
                    )
                })
        };
        Ok(RegistrySettings {
            url,
            ca: need(&self.ca, "ca.pem", "registry-ca")?,
            cert: need(&self.cert, "admin.pem", "registry-cert")?,
            key: need(&self.key, "admin.key", "registry-key")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn deprecated_names_fill_only_what_is_unset_and_warn() {
        let args = RegistryArgs {
            url: Some("https://new:7443".into()),
            ..RegistryArgs::default()
        };
        let (args, warnings) = args.with_deprecated(env(&[
            ("VNP_REGISTRY_URL", "https://old:7443"),
            ("VNP_REGISTRY_CA", "/old/ca.pem"),
        ]));
        assert_eq!(args.url.as_deref(), Some("https://new:7443"));
        assert_eq!(args.ca, Some(PathBuf::from("/old/ca.pem")));
        assert_eq!(
            warnings,
            ["VNP_REGISTRY_CA is deprecated; use VNP_CA (as vnpctl does)"]
        );
        let (args, warnings) = RegistryArgs::default()
            .with_deprecated(env(&[("VNP_REGISTRY_URL", "https://old:7443")]));
        assert_eq!(args.url.as_deref(), Some("https://old:7443"));
        assert_eq!(warnings.len(), 1);
        let (_, warnings) =
            RegistryArgs::default().with_deprecated(env(&[("VNP_REGISTRY_URL", "")]));
        assert!(warnings.is_empty(), "an empty variable is unset");
    }

    #[test]
    fn tls_dir_supplies_the_files_vnpctl_would_use() {
        let args = RegistryArgs {
            url: Some("https://r:7443".into()),
            tls_dir: Some("/etc/vnp/tls".into()),
            key: Some("/k.pem".into()),
            ..RegistryArgs::default()
        };
        let s = args.settings().unwrap();
        assert_eq!(s.ca, PathBuf::from("/etc/vnp/tls/ca.pem"));
        assert_eq!(s.cert, PathBuf::from("/etc/vnp/tls/admin.pem"));
        assert_eq!(s.key, PathBuf::from("/k.pem"));
        let no_files = RegistryArgs {
            url: Some("https://r:7443".into()),
            ..RegistryArgs::default()
        };
        let err = no_files.settings().unwrap_err();
        assert!(err.contains("--registry-ca (VNP_CA)"), "{err}");
        assert!(RegistryArgs::default()
            .settings()
            .unwrap_err()
            .contains("VNP_REGISTRY"));
    }
}
