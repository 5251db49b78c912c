//! One error type for the whole library. Every variant carries a message that says what is
//! wrong and, where there is one, what to change.

use std::path::PathBuf;

/// Errors returned by every fallible function of the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value or combination of values that the model cannot be built with.
    #[error("invalid configuration: {field}: {message}")]
    Config {
        /// The argument to change (or the format, for unreadable text).
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },

    /// Input that does not fit the model: token ids, shapes, masks, lengths.
    #[error("invalid input: {0}")]
    Input(String),

    /// A model, checkpoint or PyTorch file that is unreadable, incomplete or does not match
    /// its configuration.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// An operating-system error while reading or writing `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed. This points at a bug in the library unless the input was
    /// already rejected elsewhere.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// `message` with every run of whitespace (line breaks of nested errors included) made one
/// space, so that an error prints as one line.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Error {
    /// A configuration error on `field`.
    pub fn config(field: &'static str, message: impl Into<String>) -> Self {
        Error::Config { field, message: message.into() }
    }

    /// Input that does not fit.
    pub fn input(message: impl Into<String>) -> Self {
        Error::Input(message.into())
    }

    /// A file that is unreadable or wrong.
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File { path: path.into(), message: message.into() }
    }

    /// An operating-system error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
