"""One image's first layer by its columns: the inputs that are not zero listed first (most of an
MNIST image is blank: 82% of its pixels), then each of them times its column of stored weights,
added into the layer's outputs, so that the weights a zero input meets are never read. A layer's
rows read every stored weight, whatever its input; by columns, an image with 139 of 784 pixels
lit does a third of the multiply-adds of the 98%-zero MLP's first layer. Each multiply-add costs
more by columns (it adds into an output in memory, not a register), so the kernel takes the
columns only for an image with at most COLUMNS_BELOW of its inputs not zero (kernels.driver), and
the rows otherwise: the listing itself is a vector compare and a compressed store per 16 inputs.
The input normalisation is folded into the columns' weights and biases (columns_of), since a
blank pixel is zero only before it."""

import numpy as np

from pruning.jit import LANES, function, load, loop, store

COLUMNS_BELOW = 0.5  # the share of an image's inputs not zero up to which its first layer is taken by columns
# (the 98%-zero MLP's kernel call of one image on an AMD EPYC, Zen 5: by columns 3.1 against 4.3 us by rows on
# MNIST's test images, 17% lit; 3.6 against 4.3 at half the pixels lit at random, 4.1 at 70%, 4.6 at 90%)
DECLARATIONS = ("declare void @llvm.masked.compressstore.v16i32(<16 x i32>, ptr, <16 x i1>)\n"
                "declare i16 @llvm.ctpop.i16(i16)\n")


def columns_of(lengths, index, values, bias, inputs, shift, inverse):
    """A first layer's stored rows (each row's length, the input each entry reads, the entries, the
    biases) as columns over the model's `inputs`: (each input's first entry, and the end, as int64;
    each entry's row as uint32; the entries times inverse; the biases less shift * inverse times
    their row's sum), for inputs read as they are, not as (x - shift) * inverse."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    order = np.argsort(index, kind="stable")  # by input, each input's entries in the order of their rows
    pointers = np.zeros(inputs + 1, np.int64)
    np.cumsum(np.bincount(index, minlength=inputs), out=pointers[1:])
    scaled = values.astype(np.float64) * inverse
    folded = bias.astype(np.float64) - shift * np.bincount(rows, weights=scaled, minlength=len(bias))
    return pointers, rows[order].astype(np.uint32), scaled[order].astype(np.float32), folded.astype(np.float32)


def nonzero():
    """IR of @nonzero(x, inputs, list, count): the inputs of x that are not zero (a NaN among them),
    their indices in order into list (i32, room for `inputs`), and how many into the i64 at count."""
    lanes = ", ".join(f"i32 {k}" for k in range(LANES))
    vector = ("  %v.at = getelementptr inbounds float, ptr %x, i64 %j\n"
              "  %v = load <16 x float>, ptr %v.at, align 4\n  %lit = fcmp une <16 x float> %v, zeroinitializer\n"
              "  %j.32 = trunc i64 %j to i32\n  %j.one = insertelement <16 x i32> poison, i32 %j.32, i64 0\n"
              "  %j.all = shufflevector <16 x i32> %j.one, <16 x i32> poison, <16 x i32> zeroinitializer\n"
              f"  %ids = add <16 x i32> %j.all, <{lanes}>\n  %n = load i64, ptr %count\n"
              "  %n.at = getelementptr inbounds i32, ptr %list, i64 %n\n"
              "  call void @llvm.masked.compressstore.v16i32(<16 x i32> %ids, ptr %n.at, <16 x i1> %lit)\n"
              "  %bits = bitcast <16 x i1> %lit to i16\n  %lit.count = call i16 @llvm.ctpop.i16(i16 %bits)\n"
              "  %lit.wide = zext i16 %lit.count to i64\n  %n.next = add i64 %n, %lit.wide\n"
              "  store i64 %n.next, ptr %count\n")
    one = (load("e.v", "float", "%x", "%e") + "  %e.lit = fcmp une float %e.v, 0.0\n  %e.32 = trunc i64 %e to i32\n"
           "  %m = load i64, ptr %count\n" + store("e.32", "i32", "%e.32", "%list", "%m")  # past the list's
           + "  %m.add = zext i1 %e.lit to i64\n  %m.next = add i64 %m, %m.add\n"  # end where zero: the next
           "  store i64 %m.next, ptr %count\n")  # one goes there (m <= e < inputs: in the list's room)
    body = (f"  store i64 0, ptr %count\n  %odd = urem i64 %inputs, {LANES}\n  %blocked = sub i64 %inputs, %odd\n"
            + loop("j", 0, "%blocked", vector, LANES) + loop("e", "%blocked", "%inputs", one))
    return function("internal void @nonzero(ptr noalias %x, i64 %inputs, ptr noalias %list, ptr noalias %count)",
                    body, counters=("j", "e"))


def columns_1():
    """IR of @columns_1: b = activation(bias + the sum over the `count` inputs in list of x[input]
    times its column), the columns as columns_of stores them."""
    start = load("bias.r", "float", "%bias", "%r") + store("start", "float", "%bias.r", "%b", "%r")
    add = (load("row", "i32", "%rows_of", "%k") + "  %row.wide = zext i32 %row to i64\n"
           + load("w", "float", "%values", "%k") + load("y", "float", "%b", "%row.wide")
           + "  %y.new = call fast float @llvm.fmuladd.f32(float %w, float %xc, float %y)\n"
           + store("y.new", "float", "%y.new", "%b", "%row.wide"))
    column = (load("c", "i32", "%list", "%t") + "  %c.wide = zext i32 %c to i64\n"
              + load("xc", "float", "%x", "%c.wide") + load("first", "i64", "%pointers", "%c.wide")
              + "  %c.next = add i64 %c.wide, 1\n" + load("last", "i64", "%pointers", "%c.next")
              + loop("k", "%first", "%last", add))
    activation = (load("z", "float", "%b", "%q") + "  %z.neg = fcmp olt float %z, 0.0\n"
                  "  %z.clip = select i1 %z.neg, float 0.0, float %z\n"
                  "  %z.y = select i1 %relu, float %z.clip, float %z\n" + store("z.y", "float", "%z.y", "%b", "%q"))
    body = loop("r", 0, "%rows", start) + loop("t", 0, "%count", column) + loop("q", 0, "%rows", activation)
    return function("internal void @columns_1(ptr noalias %x, ptr noalias %list, i64 %count, ptr noalias %pointers, "
                    "ptr noalias %rows_of, ptr noalias %values, ptr noalias %bias, i64 %rows, i1 %relu, "
                    "ptr noalias %b)", body, counters=("r", "t", "k", "q"))
