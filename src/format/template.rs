//! Custom bodies: a webhook's `body_template` or `template` file, rendered
//! with minijinja over the notification. The context is the standard body
//! itself (`type`, `timestamp` and `data` with every field), so a template
//! can say anything the standard body says.
//!
//! A template is compiled once, when the config is loaded: one that does
//! not compile is a config error. Rendering happens per delivery; one that
//! fails (an undefined value printed, a wrong type, a missing filter, too
//! much work) fails that delivery with the error, nothing more.
//!
//! When the body's content type is JSON (the default, `application/json`),
//! every `{{ value }}` is inserted as JSON: strings come out quoted and
//! escaped, objects as objects, so hostile text (quotes, newlines, control
//! characters) cannot break the body, and the output is checked to be JSON
//! before it is sent. With another content type, values are inserted as
//! plain text and the output is sent as it is.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value;

use super::RenderError;

/// The content type of a templated body unless the webhook sets another.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// How much work one render may do (minijinja "fuel", roughly one unit per
/// instruction): far more than any sensible body needs, little enough that
/// a runaway loop fails its delivery within milliseconds.
pub const FUEL: u64 = 1_000_000;

/// Where a template came from, for messages and `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// `body_template = "..."`, with its text.
    Inline(String),
    /// `template = "FILE"`, with the path as resolved.
    File(PathBuf),
}

/// A compiled body template. Built once by config loading and shared by
/// every delivery of its webhook; cloning shares the compiled form.
#[derive(Clone)]
pub struct BodyTemplate {
    env: Arc<Environment<'static>>,
    /// The name the template has in the environment and in messages.
    name: String,
    /// Where it came from.
    pub source: TemplateSource,
    /// The `content-type` of the rendered body.
    pub content_type: String,
    /// Whether values are inserted as JSON and the output checked as JSON.
    json: bool,
}

impl fmt::Debug for BodyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyTemplate")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

impl BodyTemplate {
    /// Compiles `text`. `content_type` defaults to `application/json`; it
    /// decides whether values are escaped as JSON.
    pub fn compile(
        source: TemplateSource,
        text: String,
        content_type: Option<&str>,
    ) -> Result<BodyTemplate, minijinja::Error> {
        let name = match &source {
            TemplateSource::Inline(_) => "body_template".to_owned(),
            TemplateSource::File(path) => path.display().to_string(),
        };
        let content_type = content_type.unwrap_or(DEFAULT_CONTENT_TYPE).trim().to_owned();
        let json = is_json(&content_type);
        let mut env = Environment::new();
        env.set_auto_escape_callback(move |_| if json { AutoEscape::Json } else { AutoEscape::None });
        // Printing a misspelt field fails loudly instead of sending a body
        // with a hole in it; `{% if data.event %}` still works.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_fuel(Some(FUEL));
        env.add_template_owned(name.clone(), text)?;
        Ok(BodyTemplate { env: Arc::new(env), name, source, content_type, json })
    }

    /// Renders the template over a standard body.
    pub fn render(&self, standard_body: &Value) -> Result<String, RenderError> {
        let failed = |source| RenderError::Template { name: self.name.clone(), source };
        let body = self.env.get_template(&self.name).map_err(failed)?.render(standard_body).map_err(failed)?;
        if self.json
            && let Err(source) = serde_json::from_str::<serde::de::IgnoredAny>(&body)
        {
            return Err(RenderError::NotJson { name: self.name.clone(), source });
        }
        Ok(body)
    }
}

/// Whether a content type is JSON: `application/json` or any `+json` type,
/// whatever its parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inline(text: &str) -> BodyTemplate {
        BodyTemplate::compile(TemplateSource::Inline(text.into()), text.into(), None).unwrap()
    }

    #[test]
    fn values_are_inserted_as_json() {
        let t = inline(
            r#"{"text": {{ "Job " ~ data.job_id ~ " failed: " ~ data.error }}, "raw": {{ data.error }}, "labels": {{ data.labels }}, "n": {{ data.n }}}"#,
        );
        let hostile = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} </script> \u{2028}";
        let body =
            json!({"type": "job.failed", "data": {"job_id": "j1", "error": hostile, "labels": {"a": "b"}, "n": 1.5}});
        let out = t.render(&body).unwrap();
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["raw"], hostile);
        assert_eq!(parsed["text"], format!("Job j1 failed: {hostile}"));
        assert_eq!(parsed["labels"], json!({"a": "b"}));
        assert_eq!(parsed["n"], 1.5);
        assert!(!out.contains('\n') && !out.contains('\u{0}'), "{out:?}");
    }

    #[test]
    fn failures_are_errors_not_panics() {
        let undefined = inline(r#"{"x": {{ data.eror }}}"#).render(&json!({"data": {}})).unwrap_err();
        assert!(undefined.to_string().contains("cannot render body_template: undefined value"), "{undefined}");
        let quoted = inline(r#"{"x": "{{ data.error }}"}"#).render(&json!({"data": {"error": "e"}})).unwrap_err();
        assert!(quoted.to_string().contains("did not render valid JSON"), "{quoted}");
        let spin = inline("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
            .render(&json!({}))
            .unwrap_err();
        assert!(spin.to_string().contains("fuel"), "{spin}");
        let compile = BodyTemplate::compile(TemplateSource::Inline("{{ x".into()), "{{ x".into(), None).unwrap_err();
        assert!(compile.to_string().contains("syntax error"), "{compile}");
    }

    #[test]
    fn other_content_types_are_sent_as_written() {
        let t = BodyTemplate::compile(
            TemplateSource::Inline(String::new()),
            "Job {{ data.job_id }}: {{ data.error }}".into(),
            Some("text/plain; charset=utf-8"),
        )
        .unwrap();
        assert_eq!(t.render(&json!({"data": {"job_id": "j", "error": "a \"b\""}})).unwrap(), "Job j: a \"b\"");
        assert!(is_json("application/vnd.api+json") && is_json("Application/JSON; charset=utf-8"));
    }
}
