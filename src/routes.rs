//! STUB: replaced by the real route table (branch paths-routes). Signatures only.
#![allow(dead_code, unused_variables)]

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiId(pub u16);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiSet {
    bits: Box<[u64]>,
}

impl ApiSet {
    pub fn contains(&self, id: ApiId) -> bool {
        false
    }
    pub fn insert(&mut self, id: ApiId) {}
    pub fn is_empty(&self) -> bool {
        true
    }
}

pub enum RouteMatch {
    Api(ApiId),
    NoApi,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("apis[{api_index}] ({api}): route {route:?}: {reason}")]
pub struct RouteError {
    pub api_index: usize,
    pub api: String,
    pub route: String,
    pub reason: String,
}

pub struct RouteTable {
    names: Vec<String>,
}

impl RouteTable {
    pub fn build<'a>(
        apis: impl IntoIterator<Item = (&'a str, &'a [String])>,
        case_insensitive: bool,
    ) -> Result<RouteTable, Vec<RouteError>> {
        Ok(RouteTable {
            names: apis.into_iter().map(|a| a.0.to_string()).collect(),
        })
    }
    pub fn lookup(&self, method: &http::Method, canonical_path: &str) -> RouteMatch {
        RouteMatch::NoApi
    }
    pub fn method_allowed(&self, method: &http::Method) -> bool {
        true
    }
    pub fn api_id(&self, name: &str) -> Option<ApiId> {
        None
    }
    pub fn api_name(&self, id: ApiId) -> &str {
        ""
    }
    pub fn api_count(&self) -> usize {
        0
    }
    pub fn compile_grants<S: AsRef<str>>(&self, names: &[S]) -> ApiSet {
        ApiSet::default()
    }
}
