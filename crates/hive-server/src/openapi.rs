//! The OpenAPI document, built from the same table that mounts the routes (see
//! [`crate::router`]), so a route cannot exist without its documentation.

use hive_api::ApiErrorBody;
use utoipa::ToSchema;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn, Paths,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{
    ArrayBuilder, ComponentsBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, Required, ResponseBuilder,
};

/// Collects paths and schemas while the router is assembled.
#[derive(Default)]
pub struct ApiDoc {
    paths: Paths,
    schemas: Vec<(String, RefOr<Schema>)>,
}

impl std::fmt::Debug for ApiDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiDoc")
            .field("schemas", &self.schemas.len())
            .finish_non_exhaustive()
    }
}

pub fn title_case(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// Description of one operation, filled in by the route table.
pub struct Op<'a> {
    pub method: HttpMethod,
    pub path: &'a str,
    pub id: String,
    pub tag: &'a str,
    pub summary: String,
    pub body: Option<Ref>,
    pub ok_status: &'a str,
    pub ok: Option<Ref>,
    pub query: &'a [(&'a str, &'a str, Type)],
    /// Other statuses besides the errors every route may answer.
    pub errors: &'a [&'a str],
    pub auth: bool,
}

impl ApiDoc {
    /// Registers `T` (and what it refers to) and returns a reference to it.
    pub fn schema<T: ToSchema>(&mut self) -> Ref {
        let name = T::name().into_owned();
        if !self.schemas.iter().any(|(n, _)| *n == name) {
            self.schemas.push((name.clone(), T::schema()));
            T::schemas(&mut self.schemas);
        }
        Ref::from_schema_name(name)
    }

    /// Registers the list page of `T` as `<T>List`.
    pub fn list_schema<T: ToSchema>(&mut self) -> Ref {
        let item = self.schema::<T>();
        let name = format!("{}List", T::name());
        if !self.schemas.iter().any(|(n, _)| *n == name) {
            let schema = ObjectBuilder::new()
                .property("items", ArrayBuilder::new().items(item))
                .required("items")
                .property(
                    "revision",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::new(Type::Integer))
                        .minimum(Some(0)),
                )
                .required("revision")
                .property(
                    "continue",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::new(Type::String))
                        .description(Some(
                            "Pass as `continue` to get the next page; absent on the last page",
                        )),
                )
                .description(Some(format!("One page of {}s", T::name())))
                .build();
            self.schemas
                .push((name.clone(), RefOr::T(Schema::Object(schema))));
        }
        Ref::from_schema_name(name)
    }

    pub fn add(&mut self, op: Op<'_>) {
        let error = self.schema::<ApiErrorBody>();
        let mut b = OperationBuilder::new()
            .operation_id(Some(op.id.clone()))
            .tag(op.tag)
            .summary(Some(op.summary.clone()));
        for seg in op.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                b = b.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(
                            ObjectBuilder::new().schema_type(SchemaType::new(Type::String)),
                        )),
                );
            }
        }
        for (name, desc, ty) in op.query {
            b = b.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(*desc))
                    .schema(Some(
                        ObjectBuilder::new().schema_type(SchemaType::new(ty.clone())),
                    )),
            );
        }
        if let Some(body) = op.body.clone() {
            b = b.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(body)).build(),
                    )
                    .build(),
            ));
        }
        let mut ok = ResponseBuilder::new().description("success");
        if let Some(schema) = op.ok.clone() {
            ok = ok.content(
                "application/json",
                ContentBuilder::new().schema(Some(schema)).build(),
            );
        }
        b = b.response(op.ok_status, ok.build());
        let mut statuses: Vec<&str> = op.errors.to_vec();
        if op.auth {
            statuses.extend(["401", "429"]);
        }
        statuses.extend(["500", "503"]);
        for status in statuses {
            b = b.response(
                status,
                ResponseBuilder::new()
                    .description(error_description(status))
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(error.clone())).build(),
                    )
                    .build(),
            );
        }
        if op.auth {
            b = b.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        let operation: Operation = b.build();
        self.paths
            .add_path_operation(op.path, vec![op.method], operation);
    }

    pub fn finish(self) -> OpenApi {
        let components = ComponentsBuilder::new()
            .schemas_from_iter(self.schemas)
            .security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("A Hive API token (`hive_…`)"))
                        .build(),
                ),
            )
            .build();
        OpenApiBuilder::new()
            .info(
                InfoBuilder::new()
                    .title("Hive API")
                    .version(env!("CARGO_PKG_VERSION"))
                    .description(Some(
                        "Hive's REST API. Errors are JSON `{code, message, request_id}` with a stable `code`. \
                         Lists take `limit` and `continue`; with `watch=true` they stream \
                         newline-delimited watch events after `revision`.",
                    ))
                    .build(),
            )
            .paths(self.paths)
            .components(Some(components))
            .build()
    }
}

fn error_description(status: &str) -> &'static str {
    match status {
        "400" => "malformed_body: the body is not the expected JSON",
        "401" => "unauthenticated or token_expired",
        "403" => "forbidden: the token's role does not allow this",
        "404" => "not_found (also for another tenant's objects)",
        "409" => {
            "already_exists, conflict (the revision precondition failed), or not_started (no \
             container yet)"
        }
        "410" => "revision_compacted: list again and watch from the list's revision",
        "413" => "payload_too_large",
        "415" => "unsupported_media_type",
        "422" => "invalid: validation failed; the message names the field",
        "429" => "rate_limited: retry after the Retry-After header's seconds",
        "500" => "internal",
        "502" => "node_unreachable: the instance's node agent did not answer",
        "503" => "unavailable: the state store cannot be reached",
        _ => "error",
    }
}
