"""Writing LLVM's language from Python, and compiling it for this CPU with llvmlite. The kernel of
kernels.py is written with these few helpers: a function, a counted loop, a branch, a load, a
store, a vector of one value. Loop counters and accumulators live in stack slots, which LLVM turns
into registers. llvmlite itself is imported only when the kernel is first compiled (the first
for_inference of a process), never by `import pruning`."""

import ctypes

VECTOR = "<16 x float>"  # the vector every kernel loop works on: one AVX-512 register, two AVX2 ones
LANES = 16  # floats in a vector


def function(head, body, counters=(), slots=()):
    """IR of a function returning nothing: `head` is its name and arguments, `counters` the names of
    its loops' i64 counters, `slots` (name, type) pairs of its other stack slots."""
    stack = "".join(f"  %{name}.p = alloca i64\n" for name in counters)
    stack += "".join(f"  %{name}.p = alloca {kind}\n" for name, kind in slots)
    return f"\ndefine {head} {{\nentry:\n{stack}{body}  ret void\n}}\n"


def loop(name, start, stop, body, step=1):
    """IR of `for %name in range(start, stop, step): body`, its counter in the slot %name.p."""
    return (f"  store i64 {start}, ptr %{name}.p\n  br label %{name}.test\n{name}.test:\n"
            f"  %{name} = load i64, ptr %{name}.p\n  %{name}.more = icmp ult i64 %{name}, {stop}\n"
            f"  br i1 %{name}.more, label %{name}.body, label %{name}.done\n{name}.body:\n{body}"
            f"  %{name}.next = add i64 %{name}, {step}\n  store i64 %{name}.next, ptr %{name}.p\n"
            f"  br label %{name}.test\n{name}.done:\n")


def when(name, condition, body, otherwise=""):
    """IR of `if condition: body else: otherwise` (labels named after `name`)."""
    return (f"  br i1 {condition}, label %{name}.then, label %{name}.else\n{name}.then:\n{body}"
            f"  br label %{name}.end\n{name}.else:\n{otherwise}  br label %{name}.end\n{name}.end:\n")


def load(name, kind, base, index):
    """IR of %name = the `kind` at base[index] (a vector: the 16 floats from there)."""
    return (f"  %{name}.at = getelementptr inbounds {element(kind)}, ptr {base}, i64 {index}\n"
            f"  %{name} = load {kind}, ptr %{name}.at, align 4\n")


def store(name, kind, value, base, index):
    """IR of base[index] = value (a vector: the 16 floats from there); name labels the address."""
    return (f"  %{name}.to = getelementptr inbounds {element(kind)}, ptr {base}, i64 {index}\n"
            f"  store {kind} {value}, ptr %{name}.to, align 4\n")


def element(kind):
    """What an index into memory holding `kind` counts: floats for a vector."""
    return "float" if kind == VECTOR else kind


def splat(name, value):
    """IR of %name = a vector of the float `value` in every lane."""
    return (f"  %{name}.one = insertelement {VECTOR} poison, float {value}, i64 0\n"
            f"  %{name} = shufflevector {VECTOR} %{name}.one, {VECTOR} poison, <16 x i32> zeroinitializer\n")


def accumulate(name, slot, weight, x, kind=VECTOR):
    """IR of slot += weight * x."""
    fma = "@llvm.fmuladd.f32" if kind == "float" else "@llvm.fmuladd.v16f32"
    return (f"  %{name}.s = load {kind}, ptr %{slot}.p\n"
            f"  %{name}.t = call fast {kind} {fma}({kind} {weight}, {kind} {x}, {kind} %{name}.s)\n"
            f"  store {kind} %{name}.t, ptr %{slot}.p\n")


def output(name, slot, index, kind=VECTOR):
    """IR of b[index] = activation(slot)."""
    zero, test = ("0.0", "i1") if kind == "float" else ("zeroinitializer", "<16 x i1>")
    return (f"  %{name}.v = load {kind}, ptr %{slot}.p\n  %{name}.neg = fcmp olt {kind} %{name}.v, {zero}\n"
            f"  %{name}.clip = select {test} %{name}.neg, {kind} {zero}, {kind} %{name}.v\n"
            f"  %{name}.y = select i1 %relu, {kind} %{name}.clip, {kind} %{name}.v\n"
            + store(name, kind, f"%{name}.y", "%b", index))


def compiled(source, names, arguments):
    """Compile the module `source` for this CPU: (the engine that holds the code, {name: the
    function `name`, callable from Python with ctypes `arguments`})."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
    module = llvm.parse_assembly(source)
    module.triple, module.data_layout = machine.triple, str(machine.target_data)
    module.verify()
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    tuning.loop_vectorization = tuning.slp_vectorization = True
    builder = llvm.create_pass_builder(machine, tuning)
    builder.getModulePassManager().run(module, builder)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    kind = ctypes.CFUNCTYPE(None, *arguments)
    return engine, {name: kind(engine.get_function_address(name)) for name in names}
