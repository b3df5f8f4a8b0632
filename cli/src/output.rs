//! How answers are shown: `-o table` (columns chosen per resource), `json`
//! (the API's JSON as it is) or `yaml` (the same, in block style).

use serde_json::Value;

/// The output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// Columns for people.
    #[default]
    Table,
    /// The API's JSON.
    Json,
    /// The API's JSON as YAML.
    Yaml,
}

/// Prints `value` (an object, or a list of objects under `items`) with
/// `columns` for tables.
#[allow(clippy::print_stdout)]
pub fn print(format: Format, value: &Value, items: Option<&str>, columns: &[&str]) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Format::Yaml => print!("{}", yaml(value)),
        Format::Table => {
            let rows: Vec<&Value> = match items {
                Some(key) => value[key].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
                None => vec![value],
            };
            print!("{}", table(&rows, columns));
        }
    }
}

/// A table of `rows` with `columns` (dotted paths), upper-case headers.
pub fn table(rows: &[&Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> =
        rows.iter().map(|r| columns.iter().map(|c| cell(lookup(r, c))).collect()).collect();
    let headers: Vec<String> = columns.iter().map(|c| c.replace('.', "_").to_uppercase()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| cells.iter().map(|r| r[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |row: &[String]| {
        let mut s = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&headers);
    for r in &cells {
        out.push_str(&line(r));
    }
    out
}

fn lookup<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) if v.is_array() => &v[i],
        _ => &v[k],
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `value` as block-style YAML. Strings are double-quoted with JSON's
/// escapes, which YAML reads the same.
pub fn yaml(value: &Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Null => "null".to_owned(),
        Value::Array(a) if a.is_empty() => "[]".to_owned(),
        Value::Object(o) if o.is_empty() => "{}".to_owned(),
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty()) || matches!(v, Value::Object(o) if !o.is_empty())
}

fn write_yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, item) in o {
                // Words YAML reads as booleans or null are quoted.
                let reserved = ["true", "false", "null", "yes", "no", "on", "off", "y", "n"]
                    .iter()
                    .any(|w| k.eq_ignore_ascii_case(w));
                let plain = !reserved
                    && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                let key = if plain { k.clone() } else { serde_json::to_string(k).unwrap_or_default() };
                if is_block(item) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    write_yaml(item, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(item)));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                if is_block(item) {
                    out.push_str(&format!("{pad}-\n"));
                    write_yaml(item, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_show_missing_values_as_dashes() {
        let a = json!({"vm_id": "v1", "name": "web", "networks": [{"ipv4": ["10.0.0.2"]}]});
        let b = json!({"vm_id": "v22", "name": "", "networks": []});
        let t = table(&[&a, &b], &["vm_id", "name", "networks.0.ipv4"]);
        assert_eq!(t, "VM_ID  NAME  NETWORKS_0_IPV4\nv1     web   10.0.0.2\nv22    -     -\n");
    }

    #[test]
    fn yaml_is_block_style_and_quotes_strings() {
        let v = json!({"a": "x: y", "b": 2, "c": ["x"], "d": [], "e": {"k": null, "a b": true, "on": 1}});
        assert_eq!(
            yaml(&v),
            "a: \"x: y\"\nb: 2\nc:\n  - \"x\"\nd: []\ne:\n  \"a b\": true\n  k: null\n  \"on\": 1\n"
        );
    }
}
