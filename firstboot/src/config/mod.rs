//! Parsing cloud-init's documents, leniently as cloud-init does: types are coerced where the
//! meaning is clear, keys this agent does not implement are listed (by name) and skipped.

pub mod interfaces;
pub mod metadata;
pub mod network;
pub mod userdata;
pub mod value;

/// A string that must never be printed: its `Debug` shows only that it is hidden.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}
