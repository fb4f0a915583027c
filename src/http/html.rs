//! HTML built so that escaping cannot be forgotten: markup comes only from `&'static str`
//! templates written in this crate, and every value put into a template is escaped unless it is
//! itself [`Markup`] built the same way.

/// Something that can go into a template's `{}`.
pub trait Render {
    fn render(&self, out: &mut String);
}

/// Escapes text for element content and attribute values; control characters (other than
/// newline) become U+FFFD, so a device's bytes cannot break the page.
impl Render for str {
    fn render(&self, out: &mut String) {
        for c in self.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&#39;"),
                c if c.is_control() && c != '\n' => out.push('\u{fffd}'),
                c => out.push(c),
            }
        }
    }
}

impl Render for String {
    fn render(&self, out: &mut String) {
        self.as_str().render(out)
    }
}

impl<T: Render + ?Sized> Render for &T {
    fn render(&self, out: &mut String) {
        (**self).render(out)
    }
}

macro_rules! render_number {
    ($($t:ty),*) => {$(
        impl Render for $t {
            fn render(&self, out: &mut String) {
                out.push_str(&self.to_string());
            }
        }
    )*};
}
render_number!(u32, u64, usize, i64);

/// Markup under construction, or finished.
#[derive(Debug, Default, Clone)]
pub struct Markup(String);

impl Render for Markup {
    fn render(&self, out: &mut String) {
        out.push_str(&self.0)
    }
}

impl Markup {
    pub fn new() -> Markup {
        Markup(String::with_capacity(1024))
    }

    /// Appends `template`, each `{}` replaced by the next of `args`, rendered (text escaped,
    /// `Markup` as is). A `{}` without an argument stays empty; extra arguments are ignored.
    pub fn put(&mut self, template: &'static str, args: &[&dyn Render]) -> &mut Markup {
        debug_assert_eq!(
            template.matches("{}").count(),
            args.len(),
            "template {template:?}"
        );
        let mut args = args.iter();
        let mut rest = template;
        while let Some(at) = rest.find("{}") {
            self.0.push_str(&rest[..at]);
            if let Some(a) = args.next() {
                a.render(&mut self.0);
            }
            rest = &rest[at + 2..];
        }
        self.0.push_str(rest);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Escaped text, for tests and for the rare caller that needs a plain string.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    s.render(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_markup_is_not() {
        let mut inner = Markup::new();
        inner.put("<b>{}</b>", &[&"<i>"]);
        let mut m = Markup::new();
        m.put(
            "<td title=\"{}\">{} {}</td>",
            &[&"a\"b'c&", &inner, &42usize],
        );
        assert_eq!(
            m.into_string(),
            "<td title=\"a&quot;b&#39;c&amp;\"><b>&lt;i&gt;</b> 42</td>"
        );
    }

    #[test]
    fn escapes_markup_and_controls() {
        assert_eq!(
            esc("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert_eq!(esc("a\u{1b}[31m\nb"), "a\u{fffd}[31m\nb");
    }
}
