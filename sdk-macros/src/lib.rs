//! `#[task]`: turns a typed function into the component's exported `run`, binding
//! Celery's args/kwargs to its parameter names and encoding its return value as JSON.

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{parse_macro_input, spanned::Spanned, FnArg, ItemFn, Pat, ReturnType, Type};

/// Exports a function as this component's task.
///
/// Parameters are filled from the message's positional `args`, then `kwargs` by name,
/// and decoded with serde; `Option<T>` parameters may be omitted. One parameter may be
/// `&Context`. The function may return `Result<T, TaskError>`, any `T: Serialize`, or `()`.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(proc_macro2::TokenStream::from(attr).span(), "#[task] takes no arguments")
            .to_compile_error()
            .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand(&func) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) => match &*r.elem {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Context"),
            _ => false,
        },
        _ => false,
    }
}

fn returns_result(ret: &ReturnType) -> bool {
    match ret {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    }
}

fn expand(func: &ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    if func.sig.asyncness.is_some() || !func.sig.generics.params.is_empty() {
        return Err(syn::Error::new(func.sig.span(), "#[task] functions must be plain, non-generic, non-async"));
    }
    let fn_name = &func.sig.ident;
    let mut names = Vec::new();
    let mut call_args = Vec::new();
    let mut decodes = Vec::new();
    for input in &func.sig.inputs {
        let FnArg::Typed(arg) = input else {
            return Err(syn::Error::new(input.span(), "#[task] functions cannot take self"));
        };
        if is_context(&arg.ty) {
            call_args.push(quote!(__ctx));
            continue;
        }
        let Pat::Ident(ident) = &*arg.pat else {
            return Err(syn::Error::new(arg.pat.span(), "#[task] parameters must be plain names"));
        };
        let index = names.len();
        let name = ident.ident.to_string();
        let name = name.strip_prefix("r#").unwrap_or(&name).to_string();
        let var = format_ident!("__arg{}", index);
        let ty = &arg.ty;
        decodes.push(quote!(let #var: #ty = __args.take(#index)?;));
        call_args.push(quote!(#var));
        names.push(name);
    }
    let call = quote!(#fn_name(#(#call_args),*));
    let outcome = if returns_result(&func.sig.output) {
        quote!(#call.map_err(::core::convert::Into::<::taskhost_sdk::TaskError>::into))
    } else {
        quote!(::core::result::Result::<_, ::taskhost_sdk::TaskError>::Ok(#call))
    };
    Ok(quote! {
        #func

        const _: () = {
            struct __TaskhostExport;

            impl ::taskhost_sdk::bindings::Guest for __TaskhostExport {
                fn run(
                    info: ::taskhost_sdk::bindings::taskhost::task::types::TaskInfo,
                    args: ::std::string::String,
                    kwargs: ::std::string::String,
                ) -> ::core::result::Result<::std::string::String, ::taskhost_sdk::bindings::taskhost::task::types::TaskError> {
                    ::taskhost_sdk::__private::run_task(info, &args, &kwargs, &[#(#names),*], |__ctx, __args| {
                        let _ = (&__ctx, &__args);
                        #(#decodes)*
                        ::core::result::Result::Ok(#outcome)
                    })
                }
            }

            ::taskhost_sdk::bindings::__export_task_world!(__TaskhostExport with_types_in ::taskhost_sdk::bindings);
        };
    })
}
