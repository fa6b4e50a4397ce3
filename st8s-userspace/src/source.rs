//! The file source: a YAML file of Nodes and Pods, re-read when it changes.
//!
//! The file is polled (content, not only mtime), which also follows the symlink swaps a mounted
//! ConfigMap goes through.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::model::{Cluster, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
}

pub struct FileSource {
    path: PathBuf,
    last: Option<String>,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            last: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)` when the file is unchanged since the last call that returned a cluster (or an
    /// error), `Ok(Some)` with the parsed cluster when it changed.
    pub fn poll(&mut self) -> Result<Option<Cluster>, SourceError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| SourceError::Read {
            path: self.path.clone(),
            source,
        })?;
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        self.last = Some(text.clone());
        Cluster::from_yaml(&text)
            .map(Some)
            .map_err(|source| SourceError::Parse {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_changes_once() {
        let dir = std::env::temp_dir().join(format!("st8s-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n").expect("write");
        let mut s = FileSource::new(&file);
        assert_eq!(s.poll().expect("reads").expect("first read").nodes.len(), 1);
        assert!(s.poll().expect("reads").is_none(), "unchanged file");
        std::fs::write(&file, "kind: Node\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: b}\n").expect("write");
        assert_eq!(s.poll().expect("reads").expect("changed").nodes.len(), 2);
        std::fs::write(&file, "kind: [").expect("write");
        assert!(matches!(s.poll(), Err(SourceError::Parse { .. })));
        assert!(
            s.poll().expect("same broken text").is_none(),
            "a broken file is reported once"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
