//! Field-wise merging of Istio settings, as Istio merges a delegate into its root route and
//! a subset's traffic policy over its host's: a field left unset takes the other's value.

/// For each named `Option` field: when `$into.field` is `None`, take `$from.field` (cloned).
macro_rules! fill_unset {
    ($into:expr, $from:expr; $($field:ident),* $(,)?) => {$(
        if $into.$field.is_none() {
            $into.$field = $from.$field.clone();
        }
    )*};
}

pub(crate) use fill_unset;
