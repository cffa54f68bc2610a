//! `larder serve --print-config`: a resolved [`Config`] written back as the settings file
//! that would run the same server, every key filled in, with secrets masked.

use super::{
    format_duration, format_size, Config, ConfigError, DeclaredCacheFile, NarRedirect, Settings,
    SizeValue, MASK,
};
use std::time::Duration;

impl Config {
    /// The settings that run this configuration, every key written out: what
    /// [`Config::to_masked_toml`] prints. Keys chosen at run time are left unset
    /// (`database_max_connections`, `max_connections`).
    pub fn settings(&self) -> Settings {
        let duration = |d: Duration| Some(format_duration(d));
        let size = |b: u64| Some(SizeValue::Text(format_size(b)));
        let (s3_access_key_id, s3_secret_access_key) = match &self.s3_credentials {
            Some(c) => (
                Some(c.access_key_id.clone()),
                Some(c.secret_access_key.clone()),
            ),
            None => (None, None),
        };
        let caches = self
            .declared_caches
            .iter()
            .map(|c| {
                let max_size = c.max_size.map(|limit| match limit {
                    Some(b) => SizeValue::Text(format_size(b)),
                    None => SizeValue::Text("none".to_owned()),
                });
                let declared = DeclaredCacheFile {
                    private: c.private,
                    priority: c.priority,
                    max_size,
                    compression: c.compression.clone(),
                    upstream_keys: c.upstream_keys.clone(),
                    upstreams: c.upstreams.clone(),
                };
                (c.name.clone(), declared)
            })
            .collect();
        Settings {
            listen: Some(self.listen.clone()),
            data_dir: Some(self.data_dir.clone()),
            public_url: Some(self.public_url.clone()),
            database: Some(self.database.clone()),
            database_max_connections: self.database_max_connections,
            storage: Some(self.storage.clone()),
            s3_access_key_id,
            s3_secret_access_key,
            nar_redirect: Some(
                match self.nar_redirect {
                    NarRedirect::Stream => "stream",
                    NarRedirect::Presigned => "presigned",
                }
                .to_owned(),
            ),
            compression: Some(self.compression.clone()),
            compression_level: Some(self.compression_level),
            max_upload_size: size(self.max_upload_size),
            max_nar_size: size(self.max_nar_size),
            gc_interval: duration(self.gc_interval),
            evicted_nar_grace: duration(self.evicted_nar_grace),
            orphan_scan_interval: Some(
                self.orphan_scan_interval
                    .map_or_else(|| "off".to_owned(), format_duration),
            ),
            orphan_grace: duration(self.orphan_grace),
            backend_timeout: duration(self.backend_timeout),
            header_timeout: duration(self.header_timeout),
            max_connections: self.max_connections,
            max_connections_per_client: Some(self.max_connections_per_client),
            multipart_max_open: Some(self.multipart_max_open),
            multipart_max_staged: size(self.multipart_max_staged),
            multipart_idle_ttl: duration(self.multipart_idle_ttl),
            upstream_keys: Some(self.upstream_keys.iter().map(|k| k.to_string()).collect()),
            tls_cert: self.tls.as_ref().map(|t| t.cert.clone()),
            tls_key: self.tls.as_ref().map(|t| t.key.clone()),
            oidc: (!self.oidc.issuers.is_empty()
                || self.oidc.max_lifetime != super::MAX_OIDC_TOKEN_LIFETIME)
                .then(|| self.oidc.to_file()),
            caches,
            delete_undeclared_caches: Some(self.delete_undeclared_caches),
        }
    }

    /// This configuration as a config file (TOML) that would run the same server, with every
    /// secret replaced by [`MASK`]: the S3 keys, a password in the database or storage URL,
    /// and URL query values whose name says password, secret, token or key.
    pub fn to_masked_toml(&self) -> Result<String, ConfigError> {
        let mut settings = self.settings();
        if settings.s3_access_key_id.is_some() {
            settings.s3_access_key_id = Some(MASK.to_owned());
        }
        settings.database = settings.database.as_deref().map(mask_url);
        settings.storage = settings.storage.as_deref().map(mask_url);
        let mut text = String::from(
            "# larder serve: the resolved configuration (flags > environment > file > defaults); \
             secrets are masked\n",
        );
        if self.database_max_connections.is_none() {
            text.push_str("# database_max_connections is unset: 16 for PostgreSQL, 8 for SQLite\n");
        }
        if self.max_connections.is_none() {
            text.push_str("# max_connections is unset: as many as the open-file limit allows\n");
        }
        text.push_str(&toml::to_string(&settings)?);
        Ok(text)
    }
}

/// `url` with its password and any query value named like a secret replaced by [`MASK`];
/// anything that is not a URL is returned as it is (it holds no credentials a URL could).
pub fn mask_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let mut masked = false;
    if parsed.password().is_some() && parsed.set_password(Some(MASK)).is_ok() {
        masked = true;
    }
    let secret_name = |name: &str| {
        let name = name.to_ascii_lowercase();
        ["password", "passwd", "secret", "token", "key", "credential"]
            .iter()
            .any(|word| name.contains(word))
    };
    if parsed.query_pairs().any(|(name, _)| secret_name(&name)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if secret_name(&name) {
                    MASK.to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        masked = true;
    }
    if masked {
        parsed.to_string()
    } else {
        url.to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn printed_configuration_runs_the_same_server_and_hides_secrets() {
        let file: Settings = toml::from_str(
            "database = \"postgres://larder:hunter2@db:5432/larder?sslmode=require\"\n\
             storage = \"s3://nars?endpoint=http://127.0.0.1:3900&region=garage\"\n\
             s3_access_key_id = \"GK1\"\ns3_secret_access_key = \"hunter3\"\n\
             max_upload_size = \"10G\"\norphan_scan_interval = \"off\"\n\
             backend_timeout = \"90\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n\
             delete_undeclared_caches = true\n\
             [caches.main]\nmax_size = \"none\"\npriority = 30\n[caches.big]\nmax_size = 1073741824\n",
        )
        .unwrap();
        let config = Config::resolve(file, "/d".into()).unwrap();
        let text = config.to_masked_toml().unwrap();
        for secret in ["hunter2", "hunter3", "GK1"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert!(
            text.contains(
                "database = \"postgres://larder:********@db:5432/larder?sslmode=require\""
            ),
            "{text}"
        );
        assert!(text.contains("max_upload_size = \"10GiB\""), "{text}");
        assert!(text.contains("backend_timeout = \"90s\""), "{text}");
        assert!(text.contains("max_connections is unset"), "{text}");
        // Read back, it is the same configuration (but for the masked secrets).
        let back: Settings = toml::from_str(&text).unwrap();
        let again = Config::resolve(back, "/elsewhere".into()).unwrap();
        assert_eq!(again.settings().caches.len(), 2);
        assert_eq!(
            format!("{:?}", again.declared_caches),
            format!("{:?}", config.declared_caches)
        );
        assert_eq!(again.to_masked_toml().unwrap(), text);
        // Every default, printed and read back, is itself.
        let defaults = Config::resolve(Settings::default(), "/d".into()).unwrap();
        let text = defaults.to_masked_toml().unwrap();
        let back = Config::resolve(toml::from_str(&text).unwrap(), "/x".into()).unwrap();
        assert_eq!(back.to_masked_toml().unwrap(), text);
    }

    #[test]
    fn urls_lose_their_secrets() {
        for (url, masked) in [
            ("sqlite:///d/larder.db", "sqlite:///d/larder.db"),
            ("postgres://u:pw@h/db", "postgres://u:********@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&password=pw",
                "postgres://h/db?user=u&password=********",
            ),
            (
                "s3://b?endpoint=http://x:1&region=r",
                "s3://b?endpoint=http://x:1&region=r",
            ),
            (
                "s3://b?region=r&secret_access_key=s",
                "s3://b?region=r&secret_access_key=********",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }
}
